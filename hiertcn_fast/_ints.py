"""The one test of an integer argument that every layer of the package shares, and the largest seed."""

import numbers


def is_int(value) -> bool:
    """True for an integer of any kind (Python's int, NumPy's integers, any numbers.Integral) but a bool.

    Arguments that pass are stored and handed on as plain ints (``int(value)``): torch's operators, JSON and
    checkpoints then see what they expect, whatever integer type the caller used."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# The largest random seed a run takes: torch's and numpy's generators take 64-bit seeds, and a distributed run adds
# each rank to it.
SEED_LIMIT = 2**63 - 1
