"""The test app: ledger entries written by background tasks."""
