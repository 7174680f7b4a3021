"""Dataset adapters: each returns frames that satisfy recloop.contract."""
