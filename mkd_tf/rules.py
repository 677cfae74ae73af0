"""The type and range of one setting, checked before anything is written (no TensorFlow imported).

Example:
    >>> integer(1, 8).problem(9)
    'must be in [1, 8], got 9'
    >>> fraction().problem(0.5) is None
    True
"""


class Rule:
    """The type and range of one setting: ``kind`` is "int", "number", "bool" or "choice"."""

    def __init__(self, kind, low=None, high=None, choices=(), optional=False, high_open=False, low_open=False):
        self.kind, self.low, self.high, self.choices = kind, low, high, choices
        self.optional, self.high_open, self.low_open = optional, high_open, low_open

    def problem(self, value):
        """Why ``value`` is not allowed, or None."""
        if value is None:
            return None if self.optional else "must be set"
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
        if self.kind == "choice":
            return None if value in self.choices else f"must be one of {', '.join(self.choices)}, got {value!r}"
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.kind == "int" and not (is_number and float(value).is_integer()):
            return f"must be a whole number, got {value!r}"
        if not is_number or value != value or value in (float("inf"), float("-inf")):
            return f"must be a finite number, got {value!r}"
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            left = "(" if self.low_open else "["
            right = ")" if self.high_open else "]"
            low = "-inf" if self.low is None else self.low
            high = "inf" if self.high is None else self.high
            return f"must be in {left}{low}, {high}{right}, got {value!r}"
        return None


def integer(low=None, high=None, optional=False):
    """A whole number in ``[low, high]`` (``None``: unbounded; ``optional``: may be null)."""
    return Rule("int", low, high, optional=optional)


def fraction(high_open=False):
    """A number in ``[0, 1]`` (``[0, 1)`` with ``high_open``)."""
    return Rule("number", 0.0, 1.0, high_open=high_open)


POSITIVE = Rule("number", 0.0, low_open=True)
NON_NEGATIVE = Rule("number", 0.0)
BOOL = Rule("bool")

#: the finest ``--spacing`` (mm) `mkd prepare` accepts: finer than any CT or MRI voxel (clinical scanners
#: reach about 0.2 mm, micro-CT about 0.01 mm), so a smaller value is a typo (1e-8 for 1e-1?) whose
#: resampled grid could not fit in memory.
MIN_SPACING_MM = 0.01


def spacing_too_fine(spacing) -> str:
    """Why a voxel size below :data:`MIN_SPACING_MM` is refused (one phrase).

    Args:
        spacing: the voxel sizes (mm), one below the bound.

    Returns:
        The reason, naming the bound and the size of the grid a 100 mm cube would become.
    """
    voxels = 100.0 / min(spacing)
    return (
        f"every voxel size must be >= {MIN_SPACING_MM} mm (finer than any CT or MRI scanner resolves; "
        f"a 100 mm field of view would become {voxels:.3g} voxels across)"
    )
