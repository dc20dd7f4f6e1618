"""Offline training package: hashers, bundles (and later generators). CLI: ``hashaudit train``."""
