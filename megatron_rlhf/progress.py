"""Progress bars for long steps (generation over many prompts, scoring, data statistics).

``progress(total, desc)`` is a ``tqdm`` bar on stderr that draws only where someone can see
it: it is disabled when stderr is not a terminal (logs, CI, Slurm output files), on every
rank but global rank 0, or when the caller passes ``enable=False`` (a ``--no-progress``
flag). A disabled bar costs nothing and still accepts ``update``/``close``.
"""

from __future__ import annotations

import sys


def progress(total=None, desc: str = "", unit: str = "it", enable: bool = True, **kwargs):
    from tqdm import tqdm

    from megatron_rlhf.parallel import is_rank0

    show = enable and is_rank0() and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, disable=not show, **kwargs)
