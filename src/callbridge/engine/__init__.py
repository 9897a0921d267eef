"""A local, offline stand-in for the Realtime API, built from speech models that ship inside Python packages.

The speech models are the optional ``callbridge[offline]`` extra; :mod:`callbridge.engine.speech` imports them.
"""
