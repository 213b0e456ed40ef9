"""The installed package matches the source tree; the CLI starts."""

import pathlib
import subprocess
import sys
import tomllib


ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE_ROOTS = {"gemma4_jax": "gemma4_jax", "kernels": "gemma4_jax.kernels",
                "patches": "gemma4_jax.patches"}


def _source_packages():
  found = set()
  for folder, package in SOURCE_ROOTS.items():
    for init in (ROOT / folder).rglob("__init__.py"):
      relative = init.parent.relative_to(ROOT / folder).parts
      found.add(".".join((package, *relative)))
  return found


def test_every_source_package_is_listed_in_pyproject():
  config = tomllib.loads((ROOT / "pyproject.toml").read_text())
  listed = set(config["tool"]["setuptools"]["packages"])
  assert _source_packages() == listed


def test_kernels_and_patches_install_under_gemma4_jax():
  import gemma4_jax.kernels  # pylint: disable=g-import-not-at-top
  import gemma4_jax.patches  # pylint: disable=g-import-not-at-top
  assert pathlib.Path(gemma4_jax.kernels.__file__).parent == ROOT / "kernels"
  assert pathlib.Path(gemma4_jax.patches.__file__).parent == ROOT / "patches"
  assert pathlib.Path(gemma4_jax.__file__).parent == ROOT / "gemma4_jax"


def test_importing_patches_nothing():
  # A fresh interpreter: importing the package and its patches module must
  # leave Tunix exactly as it was.
  code = (
      "import tunix.models.gemma4.model as m; before = m.Attention.block;"
      "import gemma4_jax, gemma4_jax.ops, gemma4_jax.patches;"
      "assert m.Attention.block is before, 'patched on import'")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_console_script_help_lists_commands():
  out = subprocess.run([str(pathlib.Path(sys.executable).parent / "gemma4-jax"),
                        "--help"], check=True, capture_output=True,
                       text=True).stdout
  for command in ("demo", "doctor"):
    assert command in out
