"""Simulated Byzantine peers, each a Lightning Callback: gradient attacks (some omniscient: IPM and ALIE with
``omniscient=True``, MinMax, MinSum, Mimic), label flipping, and attacks on the verification protocol."""

from lightning_btard.attacks.a_little_is_enough import ALittleIsEnough
from lightning_btard.attacks.base import Attack, AttackContext, ProtocolAttack
from lightning_btard.attacks.delayed_gradient import DelayedGradient
from lightning_btard.attacks.equivocating_aggregate import EquivocatingAggregate
from lightning_btard.attacks.false_accusation import FalseAccusation
from lightning_btard.attacks.inner_product_manipulation import InnerProductManipulation
from lightning_btard.attacks.label_flipping import LabelFlipping
from lightning_btard.attacks.lying_numbers import LyingNumbers
from lightning_btard.attacks.malformed_part import MalformedPart
from lightning_btard.attacks.mimic import Mimic
from lightning_btard.attacks.min_max import MinMax, MinSum
from lightning_btard.attacks.random_direction import RandomDirection
from lightning_btard.attacks.sign_flipping import SignFlipping
from lightning_btard.attacks.uncommitted_part import UncommittedPart
from lightning_btard.attacks.withheld_reveal import WithheldReveal
from lightning_btard.attacks.withholding import Withholding
from lightning_btard.attacks.wrong_aggregate import WrongAggregate

__all__ = [
    "ALittleIsEnough",
    "Attack",
    "AttackContext",
    "ProtocolAttack",
    "DelayedGradient",
    "InnerProductManipulation",
    "LabelFlipping",
    "RandomDirection",
    "SignFlipping",
    "EquivocatingAggregate",
    "FalseAccusation",
    "LyingNumbers",
    "MalformedPart",
    "Mimic",
    "MinMax",
    "MinSum",
    "UncommittedPart",
    "WithheldReveal",
    "Withholding",
    "WrongAggregate",
]
