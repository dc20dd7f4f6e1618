"""Audits as jobs: audit types, spec validation, chunk and reduce tasks, queue, workers, reports.

An audit fans out into chunks; each chunk stores its result idempotently under its own key,
and a reduce step computes the figures once every chunk is in. What the chunks are and how
they reduce is the audit type's (``service.jobs.audit_types``: ``attack``, methods x eps over
a query set, and ``backdoor``, poisoned retraining). With ``HASHAUDIT_REDIS_URL`` chunks are RQ
jobs run by ``hashaudit worker`` processes; without it an in-process thread runs the same task
code.
"""
