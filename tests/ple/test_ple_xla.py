"""`ops.ple_lookup` / `ops.per_layer_inputs` with the XLA gather against the
float32 reference (the cases of `ple_cases`)."""

import ple_cases


class TestXla(ple_cases.ImplementationTests):
  KWARGS = dict(implementation="xla")
