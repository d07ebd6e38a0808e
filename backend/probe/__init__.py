"""Probe jobs: per-token gradients on one weight row (grads), buckets and picks (select), the job (run), the
written files (output) and ``probe-merge`` (merge). Config and tables: backend.jobs.probe."""
