"""Hash banks: signal types, the shared store and its PDQ index, list exchange (HMA / ThreatExchange formats)."""

from services.common.banks.signals import MalformedSignal, Signal, SignalType, parse_signal, pdq_hex
from services.common.banks.store import (
    AddResult,
    Bank,
    BankAction,
    BankMatch,
    HashBankStore,
    UploadSignals,
)

__all__ = [
    "AddResult",
    "Bank",
    "BankAction",
    "BankMatch",
    "HashBankStore",
    "MalformedSignal",
    "Signal",
    "SignalType",
    "UploadSignals",
    "parse_signal",
    "pdq_hex",
]
