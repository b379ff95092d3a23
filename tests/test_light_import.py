"""`import bear`, `bear --help` and `bear synth` load neither torch nor transformers (PEP 562
lazy exports): the command line answers at once and synth runs without the model stack."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers")
REPORT = "\nprint(' '.join(m for m in " + repr(HEAVY) + " if m in sys.modules) or 'light')"


def _loaded_after(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", "import sys\n" + code + REPORT],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def test_import_bear_is_light():
    assert _loaded_after("import bear, bear.decoding, bear.losses") == "light"


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["evaluate", "--help"]])
def test_help_is_light(argv):
    code = f"from bear.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
    assert _loaded_after(code) == "light"


def test_synth_is_light(tmp_path):
    out = str(tmp_path / "d")
    code = f"from bear.cli import main\nassert main(['synth', '--out', {out!r}]) == 0"
    assert _loaded_after(code) == "light"
    assert (tmp_path / "d" / "train.csv").is_file()


def test_a_public_name_is_imported_on_first_use():
    """Touching a name loads its module (and what it needs); the names are the modules' own."""
    code = "import bear\nassert bear.ItemTrie is __import__('bear.trie').trie.ItemTrie\n"
    assert _loaded_after(code) == "torch"
    assert _loaded_after("import bear\nbear.format_prompt") == "light"
