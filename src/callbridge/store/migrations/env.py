"""The Alembic environment of callbridge's store.

Migrations run on a connection the caller hands over in ``config.attributes["connection"]``: ``Store.upgrade()``
does that, on its own async engine, inside one transaction. A new revision is generated the same way, on a
connection to a database at head::

    await conn.run_sync(lambda sync: command.revision(alembic_config(sync), "what changed", autogenerate=True))
"""

from alembic import context
from sqlalchemy.engine import Connection

from callbridge.store.models import Base

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("callbridge's migrations need a connection: run them with Store.upgrade()")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters a table by copying it
)
with context.begin_transaction():
    context.run_migrations()
