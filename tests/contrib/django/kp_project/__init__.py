"""A small Django project for keyedpool's Django tests: settings and one app (ledger)."""
