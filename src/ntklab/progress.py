"""Progress bars for long loops: done/total, throughput and ETA, first step labelled compilation.

bar = progress_bar(total=10, desc="ntk blocks", unit="block")
for _ in range(10):
    ...
    bar.update(1)
bar.close()
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class CompileAwareBar:
    """A tqdm bar whose first step is labelled as compilation.

    The first update usually includes jit compilation, which would distort the throughput and ETA;
    the bar shows ``desc (compiling)`` until it arrives and restarts its clock after it.
    """

    def __init__(self, *, total: int, desc: str, unit: str, enabled: bool = True) -> None:
        self._desc = desc
        self._bar = tqdm(
            total=total,
            desc=f"{desc} (compiling)",
            unit=unit,
            disable=not enabled,
            file=sys.stderr,
            dynamic_ncols=True,
            smoothing=0.1,
        )
        self._first = True

    def update(self, n: int = 1, **postfix: object) -> None:
        """Advance by ``n`` steps and optionally show ``postfix`` values."""
        self._bar.update(n)
        if self._first:
            self._first = False
            self._bar.set_description(self._desc)
            self._bar.reset(total=self._bar.total)
            self._bar.update(n)
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        """Close the bar."""
        self._bar.close()


def progress_bar(*, total: int, desc: str, unit: str, enabled: bool = True) -> CompileAwareBar:
    """Returns a progress bar over ``total`` steps (first step labelled as compilation)."""
    return CompileAwareBar(total=total, desc=desc, unit=unit, enabled=enabled)
