"""Result codes and the client exception tree.

Design: a business outcome is a value, never an exception (hashicorp/raft returns an FSM error as
the Apply response; TigerBeetle returns a status per event).  Every event the ledger applies gets
exactly one `Code`.  Numbers are explicit and never reused: a code that is retired keeps its number
reserved, so a client built against an older table never misreads a newer server.

Within one event the ledger checks in the order of the numbers below and reports the first
failure, so the numbers are also the precedence: shape and validation errors (the body alone
decides them) come first, idempotency (`exists*`) next, and state-dependent failures last.

`TRANSIENT` holds the state-dependent failures: the same body could succeed against a different
ledger state.  The ledger remembers a transfer id that failed with one of them, so a retry returns
`ID_ALREADY_FAILED` instead of silently succeeding later (TigerBeetle's rule; see ledger.py).
A failure outside `TRANSIENT` depends only on the body, so it is not remembered: the same body
always fails the same way, and a corrected body may reuse the id.

Exceptions are for transport and misuse only (httpx `_exceptions.py` is the model):
`RaftpayError` is the root; `OutcomeUnknown` is the one a payment client must handle with care —
the request may or may not have been applied, and retrying with the same ids is the safe answer.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """One result per event (and per request for request-level outcomes)."""

    OK = 0

    # --- Batch shape (request level or event level) -------------------------------------------
    LINKED_EVENT_FAILED = 1  # this event was fine, another event of its chain failed
    LINKED_EVENT_CHAIN_OPEN = 2  # the last event of a batch carries the `linked` flag
    UNKNOWN_OPERATION = 3  # `op` is missing or not one the ledger knows
    UNKNOWN_FIELD = 4  # a key that the operation does not define
    INVALID_FIELD_TYPE = 5  # a known key with a value of the wrong type
    RESERVED_FLAG = 6  # a flag bit that is not defined for this operation

    # --- Body validation: the body alone decides ----------------------------------------------
    ID_MISSING = 10
    ID_INVALID = 11  # zero, negative, empty, or an integer beyond 2**64 - 1
    ID_TOO_LONG = 12  # a string id longer than 64 bytes of UTF-8
    FLAGS_ARE_MUTUALLY_EXCLUSIVE = 13
    CURRENCY_MISSING = 14
    CURRENCY_INVALID = 15  # not 1..2**32 - 1
    USER_DATA_INVALID = 16  # not 0..2**64 - 1
    DEBIT_ACCOUNT_ID_MISSING = 20
    DEBIT_ACCOUNT_ID_INVALID = 21
    CREDIT_ACCOUNT_ID_MISSING = 22
    CREDIT_ACCOUNT_ID_INVALID = 23
    ACCOUNTS_MUST_BE_DIFFERENT = 24
    AMOUNT_MISSING = 25
    AMOUNT_MUST_BE_POSITIVE = 26
    AMOUNT_TOO_LARGE = 27  # beyond MAX_AMOUNT
    PENDING_ID_MUST_NOT_BE_SET = 28  # only post/void name a pending transfer
    PENDING_ID_MISSING = 29
    PENDING_ID_INVALID = 30
    PENDING_ID_MUST_BE_DIFFERENT = 31  # a post/void cannot name itself
    TIMEOUT_RESERVED_FOR_PENDING_TRANSFER = 32
    TIMEOUT_INVALID = 33  # not 0..MAX_TIMEOUT_MS
    ACCOUNT_ID_MISSING = 34  # close_account without an account
    ACCOUNT_ID_INVALID = 35

    # --- Idempotency: the id was seen before --------------------------------------------------
    EXISTS_WITH_DIFFERENT_FLAGS = 40
    EXISTS_WITH_DIFFERENT_CURRENCY = 41
    EXISTS_WITH_DIFFERENT_USER_DATA = 42
    EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID = 43
    EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID = 44
    EXISTS_WITH_DIFFERENT_AMOUNT = 45
    EXISTS_WITH_DIFFERENT_PENDING_ID = 46
    EXISTS_WITH_DIFFERENT_TIMEOUT = 47
    EXISTS = 48  # same id, same body, and it was applied: nothing changes
    ID_ALREADY_FAILED = 49  # same id, same body, and it failed with a TRANSIENT code before

    # --- State: the ledger as it is now decides (TRANSIENT) -----------------------------------
    ACCOUNT_NOT_FOUND = 60  # close_account of an unknown account
    ACCOUNT_ALREADY_CLOSED = 61
    # A post/void first finds the pending transfer: it supplies the accounts left out.
    PENDING_TRANSFER_NOT_FOUND = 62
    PENDING_TRANSFER_NOT_PENDING = 63  # names a transfer that was not created as pending
    DEBIT_ACCOUNT_NOT_FOUND = 64
    CREDIT_ACCOUNT_NOT_FOUND = 65
    ACCOUNTS_MUST_HAVE_THE_SAME_CURRENCY = 66
    PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID = 67
    PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID = 68
    PENDING_TRANSFER_HAS_DIFFERENT_CURRENCY = 69
    TRANSFER_MUST_HAVE_THE_SAME_CURRENCY_AS_ACCOUNTS = 70
    EXCEEDS_PENDING_TRANSFER_AMOUNT = 71
    PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT = 72  # a void must release the whole amount
    PENDING_TRANSFER_ALREADY_POSTED = 73
    PENDING_TRANSFER_ALREADY_VOIDED = 74
    PENDING_TRANSFER_EXPIRED = 75
    DEBIT_ACCOUNT_CLOSED = 76
    CREDIT_ACCOUNT_CLOSED = 77
    OVERFLOWS_DEBITS = 78  # debits pending + posted would pass MAX_BALANCE
    OVERFLOWS_CREDITS = 79
    EXCEEDS_CREDITS = 80  # the debit account has debits_must_not_exceed_credits
    EXCEEDS_DEBITS = 81  # the credit account has credits_must_not_exceed_debits

    # --- Request level: sessions and routing (never stored as an event outcome) ---------------
    SESSION_EXPIRED = 100  # unknown or expired client session: register again
    SESSION_REQUEST_TOO_OLD = 101  # its stored reply was already discarded (client acked it)
    INVALID_REQUEST = 102  # the request itself (not an event) is malformed
    BATCH_TOO_LARGE = 103
    NOT_LEADER = 110  # ask the leader (a hint may come with it)
    NO_LEADER = 111  # no leader known right now: back off and retry
    READ_NOT_READY = 112  # a follower has not applied up to the asked version in time
    TIMEOUT = 113  # the server gave up waiting; the outcome is unknown
    OUTCOME_UNKNOWN = 114  # leadership changed with the entry in flight; retry with the same ids
    OVERLOADED = 115  # the server refused the request before proposing it: nothing happened
    INTERNAL_ERROR = 116


#: State-dependent failures: remembered against a transfer id so a retry cannot succeed later.
TRANSIENT: frozenset[Code] = frozenset(c for c in Code if 60 <= c < 100)

#: Request-level codes after which a client retries (same ids, same session) without harm.
RETRYABLE: frozenset[Code] = frozenset(
    {Code.NOT_LEADER, Code.NO_LEADER, Code.READ_NOT_READY, Code.TIMEOUT, Code.OUTCOME_UNKNOWN,
     Code.OVERLOADED}
)

#: Codes after which the request certainly changed nothing.
NOTHING_HAPPENED: frozenset[Code] = frozenset(
    {Code.NOT_LEADER, Code.NO_LEADER, Code.READ_NOT_READY, Code.OVERLOADED, Code.INVALID_REQUEST,
     Code.BATCH_TOO_LARGE, Code.SESSION_EXPIRED, Code.SESSION_REQUEST_TOO_OLD}
)


def name(code: int) -> str:
    """Lower-case name of a code as users see it (`exists_with_different_amount`), or `code_N`."""
    try:
        return Code(code).name.lower()
    except ValueError:
        return f"code_{code}"


# --- Client exception tree (transport and misuse, never business outcomes) ----------------------


class RaftpayError(Exception):
    """Root of everything the client library raises."""


class ProtocolError(RaftpayError):
    """A peer sent a frame that does not decode or does not follow the protocol."""


class FrameTooLarge(ProtocolError):
    """A frame is larger than the agreed maximum."""


class RequestRejected(RaftpayError):
    """The server answered with a request-level code that is final (e.g. invalid_request)."""

    def __init__(self, code: int, message: str = ""):
        self.code = code
        super().__init__(f"{name(code)}: {message}" if message else name(code))


class Unavailable(RaftpayError):
    """No node could take the request before the deadline; nothing was applied."""


class OutcomeUnknown(RaftpayError):
    """The request may or may not have been applied.

    Retry with the same ids (the client does this by itself until its deadline); a transfer id
    that was applied answers `exists`, one that was not is applied once.
    """
