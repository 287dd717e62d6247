"""Where the project's own data folders are: conf/, the study definitions, the benchmark scripts.

A wheel ships them inside the package (pyproject.toml maps conf/ to `federated._conf`,
experiments/studies/ to `federated._studies`, experiments/bench/ to `federated._bench`), so an
install without a clone finds them through importlib.resources. An editable install
(`pip install -e .`) has no such folders inside `federated/`: it reads the repository's own
conf/ and experiments/ folders, so an edit there takes effect without reinstalling.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

# name of the data package inside `federated` -> its folder in a source checkout
SHIPPED = {
    "_conf": Path("conf"),
    "_studies": Path("experiments") / "studies",
    "_bench": Path("experiments") / "bench",
}


def checkout_root() -> Path:
    """The folder that holds `federated/` (a source checkout's root when installed editable)."""
    return Path(__file__).resolve().parents[2]


def shipped_dir(name: str) -> Path:
    """The data folder `name` (a key of SHIPPED): the wheel's copy, else the checkout's folder.

    When neither exists, the checkout path comes back, so the caller's "not found" message names
    the place an editable install would read.
    """
    if name not in SHIPPED:
        raise KeyError(f"unknown data folder {name!r}; known: {', '.join(sorted(SHIPPED))}")
    packaged = files("federated").joinpath(name)
    # An installed wheel is unpacked on disk, so the Traversable is a real path.
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    return checkout_root() / SHIPPED[name]
