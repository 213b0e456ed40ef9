"""What `hlo_buffers` finds live at a program's peak.

A hand-written scheduled module checks the liveness rule exactly (views,
tuple elements, outputs, memory spaces, tiles); a program compiled for an
abstract v5e checks that the estimate is near XLA:TPU's own temporaries and
names the buffer that dominates them.
"""

import jax
import jax.numpy as jnp
import pytest

from gemma4_jax import hlo_buffers
from gemma4_jax import testing

# Instructions in schedule order. %wide's element 1 (4 MiB) dies at %c while
# element 0 (2 KiB) lives to the end; %vmem is in VMEM (S(1)); %root is the
# output. The peak is at %c: %a (1 MiB) + both elements of %wide + %c.
MODULE = """\
HloModule m, is_scheduled=true

%fused (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %n = f32[4]{0} negate(%p)
}

ENTRY %main (x: f32[512,512]) -> f32[512,512] {
  %x = f32[512,512]{1,0:T(8,128)} parameter(0)
  %a = f32[512,512]{1,0:T(8,128)} fusion(%x), kind=kLoop, calls=%fused, metadata={op_name="jit(f)/a"}
  %wide = (f32[512]{0:T(1024)}, f32[1024,1024]{1,0:T(8,128)}) fusion(%a), kind=kLoop, calls=%fused, metadata={op_name="jit(f)/wide"}
  %w1 = f32[1024,1024]{1,0:T(8,128)} get-tuple-element(%wide), index=1
  %c = f32[512,512]{1,0:T(8,128)} fusion(%w1, %a), kind=kLoop, calls=%fused, metadata={op_name="jit(f)/c"}
  %vmem = f32[512,512]{1,0:T(8,128)S(1)} copy(%c)
  %w0 = f32[512]{0:T(1024)} get-tuple-element(%wide), index=0
  %v = f32[512,512]{1,0:T(8,128)} bitcast(%c)
  ROOT %root = f32[512,512]{1,0:T(8,128)} fusion(%v, %w0, %vmem), kind=kLoop, calls=%fused
}
"""
MIB = 2**20


def test_liveness_of_views_tuple_elements_and_memory_spaces():
  found = {b.name: b for b in hlo_buffers.buffers(MODULE)}
  # The output, the parameter and the VMEM copy are not HBM temporaries.
  assert set(found) == {"a", "wide#0", "wide#1", "c"}
  assert found["wide#0"].bytes == 1024 * 4   # padded to its 1024 tile
  assert found["wide#1"].bytes == 4 * MIB
  assert found["wide#1"].last_use == found["c"].defined
  assert found["wide#0"].last_use == found["c"].last_use  # through %root
  assert found["c"].op_name == "jit(f)/c"
  peak = hlo_buffers.peak(MODULE)
  assert peak.bytes == 1 * MIB + 4096 + 4 * MIB + 1 * MIB
  assert [b.name for b in peak.buffers] == ["wide#1", "a", "c", "wide#0"]


def test_array_bytes_pads_to_the_tile_and_skips_other_memories():
  assert hlo_buffers.array_bytes("bf16", "3,100", "{1,0:T(8,128)(2,1)}") == (
      8 * 128 * 2)
  assert hlo_buffers.array_bytes("f32", "7", None) == 28
  assert hlo_buffers.array_bytes("f32", "8,128", "{1,0:T(8,128)S(5)}") is None
  assert hlo_buffers.array_bytes("token", "", None) is None


@pytest.mark.skipif(testing.libtpu_missing() is not None,
                    reason=str(testing.libtpu_missing()))
def test_estimate_names_the_dominant_buffer_of_a_tpu_program():
  # tanh(x @ w1), [4096, 4096] float32, is kept for the backward pass.
  def f(x, w1, w2):
    return jnp.sum(jnp.tanh(jnp.tanh(x @ w1) @ w2) ** 2)

  x = testing.tpu_struct((4096, 1024), jnp.float32)
  w1 = testing.tpu_struct((1024, 4096), jnp.float32)
  w2 = testing.tpu_struct((4096, 1024), jnp.float32)
  compiled = testing.compile_for_tpu(jax.grad(f, argnums=(1, 2)), x, w1, w2)
  peak = hlo_buffers.peak(compiled.as_text())
  xla = testing.temp_bytes(compiled)
  assert xla >= 64 * MIB
  assert 0.9 * xla <= peak.bytes <= 1.1 * xla, (peak.bytes, xla)
  assert peak.buffers[0].shape.startswith("f32[4096,4096]")
