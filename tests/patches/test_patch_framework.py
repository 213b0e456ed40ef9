"""apply / revert / applied / status and the target checks, on real Tunix.

The "changed target" cases change the installed Tunix module in place with
monkeypatch (restored after each test). These tests are about google-tunix
0.1.7 as installed; tests/tunix_main/ runs the patches against Tunix main's
real code. `test_split_layout_detection_and_checks` checks detection and
checking on a module put together from 0.1.7's parts.
"""

import importlib.machinery
import subprocess
import sys
import types
import warnings

import pytest
from tunix.models.gemma4 import model as gemma4_lib

import gemma4_jax.patches as patches
from gemma4_jax.patches import _framework
from gemma4_jax.patches import tunix_attention

TARGET = "tunix.models.gemma4.model:Attention.block"
PLE_TARGET = "tunix.models.gemma4.model:Embedder.encode_per_layer_input"
LORA_TARGET = "qwix._src.providers.lora:LoraProvider.get_intercept_map"
MASK_TARGET = "tunix.sft.utils:make_causal_attn_mask"
LOSS_TARGET = "tunix.sft.peft_trainer:_default_loss_fn"
LOSS_V2_MODULE = "tunix.experimental.train.peft_trainer_v2"
ORIGINAL = gemma4_lib.Attention.__dict__["block"]


@pytest.fixture(autouse=True)
def _unpatched_between_tests():
  patches.revert()
  assert gemma4_lib.Attention.block is ORIGINAL
  yield
  patches.revert()


def test_import_patches_nothing_and_imports_no_tunix():
  code = ("import sys, gemma4_jax.patches as p; "
          "assert not any(m.startswith('tunix') for m in sys.modules), "
          "sorted(m for m in sys.modules if m.startswith('tunix'))")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_apply_reports_and_revert_restores_the_original_object():
  report = patches.apply(loss=False)
  assert report.patched == (TARGET, PLE_TARGET, LORA_TARGET, MASK_TARGET)
  assert gemma4_lib.Attention.block is not ORIGINAL
  assert gemma4_lib.Attention.block.__wrapped__ is ORIGINAL
  states = {t.feature: t.state for t in report.targets}
  assert states == {"attention": "patched", "ple": "patched",
                    "lora": "patched", "loss": "skipped", "mask": "patched",
                    "remat": "skipped"}
  assert report.tunix_version == "0.1.7" and report.qwix_version == "0.1.8"
  assert report.implementation is None
  assert report.resolved_implementation == "pallas_tpu on TPU, xla elsewhere"
  assert TARGET in str(report)
  runs = {t.feature: t.runs for t in report.targets}
  assert runs == {
      "attention": ("ops.attention: pallas_tpu on TPU, xla elsewhere",),
      "ple": ("ops.ple_lookup: xla everywhere; its Pallas kernel only with "
              "implementation='pallas_tpu'",
              "ops.combine_per_layer_inputs: xla everywhere (one fusion, no "
              "kernel)"),
      "lora": ("ops.lora_einsum: xla everywhere; its Pallas kernel only with "
               "implementation='pallas_tpu'",),
      "loss": (), "mask": (), "remat": ()}
  stock = {t.feature: t.stock for t in report.targets if t.stock}
  assert set(stock) == {"attention", "ple", "lora", "mask"}
  assert "dropout > 0" in stock["lora"] and "31B" in stock["ple"]
  text = str(report)
  for target in report.targets:
    assert all(f"runs  {run}" in text for run in target.runs)
    assert not target.stock or f"stock {target.stock}" in text
  assert patches.revert() == (MASK_TARGET, LORA_TARGET, PLE_TARGET, TARGET)
  assert gemma4_lib.Attention.block is ORIGINAL
  assert patches.revert() == ()


def test_apply_twice_is_harmless_and_other_options_replace_cleanly():
  first = patches.apply()
  patched = gemma4_lib.Attention.block
  assert patches.apply() == first
  assert gemma4_lib.Attention.block is patched

  report = patches.apply(implementation="reference")
  assert report.resolved_implementation == "reference"
  assert gemma4_lib.Attention.block is not patched
  assert gemma4_lib.Attention.block.__wrapped__ is ORIGINAL
  assert patches.status().implementation == "reference"

  report = patches.apply(attention=False, ple=False, loss=False)
  assert report.patched == (LORA_TARGET,)
  assert report.targets[0].state == "skipped"
  assert gemma4_lib.Attention.block is ORIGINAL


def test_report_follows_implementation_remat_and_host_table():
  report = patches.apply(implementation="pallas_tpu", interpret=True,
                         ple="host", remat="full")
  runs = {t.feature: t.runs for t in report.targets}
  assert runs["attention"] == ("ops.attention: pallas_tpu (interpret mode)",)
  assert runs["ple"][0] == ("ops.ple_lookup: host-resident table, rows "
                            "gathered on the host")
  assert runs["loss"] == ("ops.softcapped_cross_entropy: pallas_tpu "
                          "(interpret mode)",)
  assert runs["remat"] == ("each decoder layer under jax.checkpoint policy "
                           "'full'",)
  report = patches.apply(implementation="pallas_tpu", loss=False)
  assert report.targets[0].runs == ("ops.attention: pallas_tpu (TPU only)",)
  # google-tunix 0.1.7 has no peft_trainer_v2: one loss target, no error.
  report = patches.apply(implementation="xla")
  assert [t.target for t in report.targets if t.feature == "loss"] == [
      LOSS_TARGET]
  assert report.targets[0].runs == ("ops.attention: xla",)


# A trainer module shaped like Tunix main's peft_trainer_v2: its own copy of
# the default loss, which its PeftTrainer takes when built. `exec`'d so that
# `_default_loss_fn` is a global name of `__init__` (what the check reads).
_V2_SOURCE = """
from tunix.sft import peft_trainer as _v1


def _default_loss_fn(model, input_tokens, input_mask, positions,
                     attention_mask, images=None):
  return _v1._default_loss_fn(model, input_tokens, input_mask, positions,
                              attention_mask, images)


class PeftTrainer:
  def __init__(self):
    self.loss_fn = _default_loss_fn
"""


def test_one_feature_patches_every_trainer_present(monkeypatch):
  """The loss feature maps to each trainer module that exists: with a
  peft_trainer_v2 present both are patched, reported, reverted together.
  tests/patches/test_patch_loss.py runs Tunix main's real one."""
  for name in ("tunix.experimental", "tunix.experimental.train"):
    package = types.ModuleType(name)
    package.__spec__ = importlib.machinery.ModuleSpec(name, None,
                                                      is_package=True)
    package.__path__ = []
    monkeypatch.setitem(sys.modules, name, package)
  v2 = types.ModuleType(LOSS_V2_MODULE)
  v2.__spec__ = importlib.machinery.ModuleSpec(LOSS_V2_MODULE, None)
  exec(compile(_V2_SOURCE, LOSS_V2_MODULE, "exec"), v2.__dict__)  # pylint: disable=exec-used
  monkeypatch.setitem(sys.modules, LOSS_V2_MODULE, v2)
  stock_v2 = v2._default_loss_fn  # pylint: disable=protected-access
  v2_target = f"{LOSS_V2_MODULE}:_default_loss_fn"

  report = patches.apply()
  assert report.patched == (TARGET, PLE_TARGET, LORA_TARGET, LOSS_TARGET,
                            v2_target, MASK_TARGET)
  losses = [t for t in report.targets if t.feature == "loss"]
  assert [t.target for t in losses] == [LOSS_TARGET, v2_target]
  assert all(t.runs == ("ops.softcapped_cross_entropy: pallas_tpu on TPU, "
                        "xla elsewhere",) for t in losses)
  assert v2._default_loss_fn.__wrapped__ is stock_v2  # pylint: disable=protected-access
  assert v2.PeftTrainer().loss_fn is v2._default_loss_fn  # pylint: disable=protected-access
  status = [t for t in patches.status().targets if t.feature == "loss"]
  assert [(t.target, t.patched) for t in status] == [(LOSS_TARGET, True),
                                                     (v2_target, True)]
  assert patches.revert() == (MASK_TARGET, v2_target, LOSS_TARGET,
                              LORA_TARGET, PLE_TARGET, TARGET)
  assert v2._default_loss_fn is stock_v2  # pylint: disable=protected-access

  # A v2 whose trainer no longer takes the default loss is refused by name.
  exec("class PeftTrainer:\n  def __init__(self):\n    pass\n",  # pylint: disable=exec-used
       v2.__dict__)
  with pytest.raises(patches.TargetChangedError,
                     match=r"peft_trainer_v2.PeftTrainer.__init__ no longer "
                     "uses _default_loss_fn"):
    patches.apply()
  assert v2._default_loss_fn is stock_v2  # pylint: disable=protected-access


def test_applied_restores_on_exit_and_on_exception():
  with patches.applied(loss=False) as report:
    assert report.patched == (TARGET, PLE_TARGET, LORA_TARGET, MASK_TARGET)
    assert gemma4_lib.Attention.block is not ORIGINAL
  assert gemma4_lib.Attention.block is ORIGINAL

  with pytest.raises(ZeroDivisionError):
    with patches.applied():
      assert gemma4_lib.Attention.block is not ORIGINAL
      _ = 1 / 0
  assert gemma4_lib.Attention.block is ORIGINAL


def test_applied_restores_the_patches_in_place_before_it():
  patches.apply()
  outer = gemma4_lib.Attention.block
  with patches.applied(implementation="reference"):
    assert gemma4_lib.Attention.block is not outer
  assert gemma4_lib.Attention.block is outer
  assert patches.status().targets[0].patched


def test_status():
  status = patches.status()
  attention, *others = status.targets
  assert (attention.feature, attention.target) == ("attention", TARGET)
  assert attention.available and not attention.patched
  assert attention.version == "0.1.7" and attention.version_known
  assert [t.feature for t in others] == ["ple", "lora", "loss", "mask",
                                         "remat"]
  ple, lora, loss, mask, remat = others
  assert ple.available and not ple.patched
  assert lora.available and lora.target == LORA_TARGET and not lora.patched
  assert loss.available and not loss.patched
  assert mask.available and mask.target == MASK_TARGET and not mask.patched
  assert remat.available and not remat.patched
  assert status.implementation is None
  with patches.applied(implementation="xla"):
    status = patches.status()
    assert status.targets[0].patched and status.implementation == "xla"
    assert "patched" in str(status)
  assert not patches.status().targets[0].patched


def _assert_changed(match):
  with pytest.raises(patches.TargetChangedError, match=match) as error:
    patches.apply()
  assert "0.1.7" in str(error.value)
  assert "Nothing was patched" in str(error.value)
  assert isinstance(error.value, RuntimeError)
  assert patches.status().targets[0].available is False


def test_missing_function_raises_and_patches_nothing(monkeypatch):
  monkeypatch.delattr(gemma4_lib, "apply_rope")
  _assert_changed("tunix.models.gemma4.model.apply_rope is missing")
  assert gemma4_lib.Attention.block is ORIGINAL


def test_changed_block_signature_raises_and_patches_nothing(monkeypatch):
  def block(self, x, positions, cache, attn_mask):  # a changed signature
    del self, x, positions, cache, attn_mask
  monkeypatch.setattr(gemma4_lib.Attention, "block", block)
  _assert_changed(r"Attention.block takes \(self, x, positions, cache, "
                  r"attn_mask\), expected \(self, x, segment_pos")
  assert gemma4_lib.Attention.block is block


def test_changed_init_raises_and_patches_nothing(monkeypatch):
  original_init = gemma4_lib.Attention.__init__

  def init(self, config, attn_type, rngs):  # stores none of what block reads
    original_init(self, config, attn_type, rngs)
  monkeypatch.setattr(gemma4_lib.Attention, "__init__", init)
  _assert_changed("Attention.__init__ no longer uses config, attn_type, "
                  "q_einsum")
  assert gemma4_lib.Attention.block is ORIGINAL


def test_missing_config_field_raises(monkeypatch):
  monkeypatch.delattr(gemma4_lib, "ShardingConfig")
  _assert_changed("tunix.models.gemma4.model.ShardingConfig is missing")


def test_changed_target_while_patched_keeps_the_patch(monkeypatch):
  patches.apply()
  patched = gemma4_lib.Attention.block
  monkeypatch.delattr(gemma4_lib, "shard")
  with pytest.raises(patches.TargetChangedError, match="shard is missing"):
    patches.apply(implementation="reference")
  assert gemma4_lib.Attention.block is patched


def test_untested_version_warns_and_patches(monkeypatch):
  installed = _framework.installed_version
  monkeypatch.setattr(
      _framework, "installed_version",
      lambda d: "0.1.99" if d == "google-tunix" else installed(d))
  with pytest.warns(UserWarning, match="google-tunix 0.1.99 is not among"):
    report = patches.apply(loss=False)
  assert report.patched == (TARGET, PLE_TARGET, LORA_TARGET, MASK_TARGET)
  assert "untested" in report.targets[0].reason
  status = patches.status()
  assert status.targets[0].available and not status.targets[0].version_known


def test_failure_while_patching_rolls_back_everything():
  """A second target whose replacement cannot be built: the first one, already
  patched, is restored, and the patches from before the call come back."""
  def broken(original, options):
    raise RuntimeError("cannot build the replacement")
  (attention,) = tunix_attention.targets()
  second = _framework.Target(
      feature="test", module="tunix.models.gemma4.model",
      attribute="FeedForward.block", distribution="google-tunix",
      known_versions=("0.1.7",), known_to_work="google-tunix 0.1.7",
      requirements=(), make_replacement=broken)
  ffw_block = gemma4_lib.FeedForward.__dict__["block"]

  for before in (None, "reference"):
    if before is not None:
      patches.apply(implementation=before)
    in_place = gemma4_lib.Attention.block
    with _framework.LOCK, pytest.raises(RuntimeError, match="cannot build"):
      _framework.install((attention, second), _framework.OpOptions("xla"))
    assert gemma4_lib.Attention.block is in_place
    assert gemma4_lib.FeedForward.__dict__["block"] is ffw_block
    assert patches.status().targets[0].patched == (before is not None)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(implementation="fast"), ValueError, "unknown implementation 'fast'"),
    (dict(implementation=3), TypeError, "implementation must be a str"),
    (dict(attention="yes"), TypeError, "attention must be a bool"),
    (dict(loss=None), TypeError, "loss must be a bool"),
    (dict(interpret=1), TypeError, "interpret must be a bool"),
])
def test_bad_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    patches.apply(**kwargs)
  with pytest.raises(error, match=match):
    with patches.applied(**kwargs):
      pass
  assert gemma4_lib.Attention.block is ORIGINAL


def test_split_layout_detection_and_checks(monkeypatch):
  """Tunix main's layout: found by its module, checked by its signature,
  known by its layout although the version string says 0.1.7.

  The module is assembled from 0.1.7's parts with `block` taking
  `segment_ids`, as in Tunix main's attention.py; tests/tunix_main/ runs the
  real one.
  """
  class Attention(gemma4_lib.Attention):
    def block(self, x, segment_pos, cache, attn_mask, kv_shared_cache=None,
              segment_ids=None):
      raise AssertionError("not run")

  def fake_module(name, **attributes):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attributes)
    monkeypatch.setitem(sys.modules, name, module)
    return module

  fake_module("tunix.models.gemma4.config",
              ModelConfig=gemma4_lib.ModelConfig,
              ShardingConfig=gemma4_lib.ShardingConfig)
  fake_module("tunix.models.gemma4.attention", Attention=Attention,
              apply_rope=gemma4_lib.apply_rope, shard=gemma4_lib.shard,
              AttentionType=gemma4_lib.AttentionType)
  assert "segment_ids" in tunix_attention.SPEC.detect_layout().parameters

  status = patches.status().targets[0]
  assert status.target == "tunix.models.gemma4.attention:Attention.block"
  assert status.available and status.version_known and status.version == "0.1.7"
  split_block = Attention.__dict__["block"]
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a known layout: no untested warning
    with patches.applied(ple=False, loss=False) as report:
      assert report.patched == (status.target, LORA_TARGET, MASK_TARGET)
      assert "Tunix main c7d8950f layout" in report.targets[0].reason
      assert Attention.__dict__["block"].__wrapped__ is split_block
      assert gemma4_lib.Attention.block is ORIGINAL
  assert Attention.__dict__["block"] is split_block

  def old_block(self, x, segment_pos, cache, attn_mask, kv_shared_cache=None):
    raise AssertionError("not run")
  monkeypatch.setattr(Attention, "block", old_block)
  with pytest.raises(patches.TargetChangedError,
                     match=r"expected \(.*kv_shared_cache, segment_ids\)"):
    patches.apply()
