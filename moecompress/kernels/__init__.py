"""Triton kernels for running compressed MoE models (imported as ``moecompress.kernels``).

Public ops, each ``<op>.py`` = launcher + small dataclasses + a ``<op>_torch`` reference twin:

* ``routing.route``                    softmax / sigmoid(+bias, group-limited) top-k routing
* ``moe_align.moe_align_block_size``   slots sorted by expert into GEMM blocks (zero experts dropped)
* ``moe_align_triton.moe_align_block_size_triton``   the same in one launch, small slot counts (default
  on CUDA; ``MOECOMPRESS_TRITON_ALIGN=0`` turns it off)
* ``fused_moe.fused_moe``              expert MLP, dense or int4/int8 group-quantized weights
* ``quant_matmul.quant_linear``        dense int4/int8 group-quantized linear
* ``rmsnorm.rmsnorm``                  RMSNorm with optional fused residual add
* ``packing.repack_for_kernel``        canonical quantized layout -> kernel layout (once, at load)
* ``tuning.get_config``                tile configs from ``configs/*.json``

Nothing is imported here so that ``import moecompress.kernels`` does not import triton (the tests
must set TRITON_INTERPRET before triton is first imported; see ``testing.ensure_interpreter``).
"""
