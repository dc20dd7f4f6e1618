"""Attacks on deep hashing, all behind one registry (``ATTACKS``); names are the API's names.

Importing this package registers every attack.
"""

from service.attacks import dhta as _dhta  # noqa: F401
from service.attacks import generator_attack as _generator_attack  # noqa: F401
from service.attacks import hag as _hag  # noqa: F401
from service.attacks import pgd as _pgd  # noqa: F401
from service.attacks import tha as _tha  # noqa: F401
from service.attacks import universal as _universal  # noqa: F401
from service.attacks import worst_case as _worst_case  # noqa: F401
from service.attacks.base import (
    ATTACKS,
    Attack,
    AttackContext,
    AttackInputError,
    create_attack,
    project,
    to_uint8_within,
)

__all__ = [
    "ATTACKS", "Attack", "AttackContext", "AttackInputError", "create_attack", "project",
    "to_uint8_within",
]
