# A host application's side of callbridge, in Sinatra: every request callbridge makes to it, verified.
#
# callbridge signs each request per Standard Webhooks (webhook-id, webhook-timestamp, webhook-signature) with
# CALLBRIDGE_WEBHOOK_SECRET; this app checks the signature over the raw body with the standardwebhooks gem before
# it reads anything, and answers the context request, the webhooks (call.ended) and the lookup_order HTTP tool.
#
#   bundle install
#   CALLBRIDGE_WEBHOOK_SECRET=whsec_... bundle exec ruby app.rb -p 8000

require "json"
require "set"
require "sinatra"
require "standardwebhooks"

WEBHOOK = StandardWebhooks::Webhook.new(ENV.fetch("CALLBRIDGE_WEBHOOK_SECRET"))

# What the host application knows; a real one reads its database.
CUSTOMERS = {
  "customer-42" => {
    name: "Ada",
    greeting: "Hello Ada, this is Bright Dental calling about your appointment tomorrow.",
    instructions: "You are Bright Dental's assistant. Confirm Ada's appointment tomorrow at 10:00.",
    items: [{ role: "user", text: "Last visit: a cleaning in May." }],
    metadata: { customer_id: 42 }
  }
}.freeze
ORDERS = {
  42 => { status: "shipped", delivery: "Thursday" },
  7 => { status: "being packed", delivery: "next week" }
}.freeze
SEEN_DELIVERIES = Set.new

helpers do
  # The request's JSON body, once its signature is verified (401 otherwise: never act on an unsigned body).
  def verified
    body = request.body.read
    headers = {
      "webhook-id" => request.env["HTTP_WEBHOOK_ID"],
      "webhook-timestamp" => request.env["HTTP_WEBHOOK_TIMESTAMP"],
      "webhook-signature" => request.env["HTTP_WEBHOOK_SIGNATURE"]
    }
    WEBHOOK.verify(body, headers)
  rescue StandardWebhooks::WebhookVerificationError => e
    logger.warn("refused a request: #{e.message}")
    halt 401, { "Content-Type" => "application/json" }, { detail: "invalid signature" }.to_json
  end
end

# {"call_sid", "reference", "agent", "from", "to"} in; the call's context out (every field optional).
post "/callbridge/context" do
  payload = verified
  content_type :json
  (CUSTOMERS[payload["reference"].to_s] || {}).to_json
end

# Post-call and live-event webhooks. A retry carries the same webhook-id: handle each delivery once.
post "/callbridge/webhooks" do
  payload = verified
  delivery = request.env["HTTP_WEBHOOK_ID"]
  halt 204 if SEEN_DELIVERIES.include?(delivery)
  SEEN_DELIVERIES << delivery
  if payload["event"] == "call.ended"
    call = payload["call"]
    logger.info("call.ended #{call["call_sid"]} (#{call["end_reason"]}): #{payload["transcript"].length} lines")
  else
    logger.info("#{payload["event"]} #{payload["call_sid"]}")
  end
  status 204
end

# {"call_sid", "tool", "arguments": {"order_id"}, "context"} in; any JSON out is what the model hears.
post "/callbridge/tools/lookup_order" do
  payload = verified
  order_id = payload["arguments"]["order_id"]
  order = ORDERS[order_id]
  content_type :json
  if order
    { order_id: order_id, found: true, **order }.to_json
  else
    { order_id: order_id, found: false }.to_json
  end
end
