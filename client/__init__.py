"""xkt site side: fetch, verify, adapt, evaluate."""
