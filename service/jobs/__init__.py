"""Robustness audits as jobs: spec validation, chunk and reduce tasks, queue, workers, reports.

An audit runs methods x eps over a query set. It fans out into chunks (a few hundred queries
for one method and eps); each chunk stores its adversarial codes idempotently under its own
key, and a reduce step computes the figures once every chunk is in. With
``HASHAUDIT_REDIS_URL`` chunks are RQ jobs run by ``hashaudit worker`` processes; without it
an in-process thread runs the same task code.
"""
