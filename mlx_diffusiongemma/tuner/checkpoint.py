"""`--grad-checkpoint`: mlx-lm's gradient checkpointing, its backward pass ordered per layer.

mlx-lm's `grad_checkpoint` wraps each layer in `mx.checkpoint`: the layer's activations are
recomputed in the backward pass. The gradients that pass leaves behind are evaluated in the
order MLX's scheduler finds them, and the input gradient (which the layer below waits on) comes
before the layer's own parameter gradients: each layer's recomputed activations that only its
parameter gradients read (for LoRA on the experts, the expert outputs' gradients, ~0.1 GB a layer
at the 26B's width) then stay alive until the whole backward pass is done. Here the input
gradient is made to wait on the parameter gradients (`mx.depends`), so those activations are
freed layer by layer. Same recomputation, same numbers (tests/test_tuner_loss.py); measured in
benchmarks/RESULTS.md (fine-tuning).
"""

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten


class _Slot:
    """Where the i-th array of a flattened argument list goes back."""

    def __init__(self, i: int):
        self.i = i


def _take_arrays(tree, arrays: list, wanted):
    """`tree` (tuples and lists of arrays and other values) with the arrays `wanted` picks moved
    to `arrays` and slots left in their place."""
    if isinstance(tree, mx.array) and wanted(tree):
        arrays.append(tree)
        return _Slot(len(arrays) - 1)
    if isinstance(tree, (tuple, list)):
        return type(tree)(_take_arrays(t, arrays, wanted) for t in tree)
    return tree


def _put_arrays(tree, arrays):
    if isinstance(tree, _Slot):
        return arrays[tree.i]
    if isinstance(tree, (tuple, list)):
        return type(tree)(_put_arrays(t, arrays) for t in tree)
    return tree


def _floating(a: mx.array) -> bool:
    return mx.issubdtype(a.dtype, mx.floating)


def grad_checkpoint(layer):
    """Makes every instance of type(layer) recompute its forward pass in the backward pass (as
    mlx-lm's `grad_checkpoint`, the same patch of the class); returns a function that undoes it.
    The layer's float array arguments (nested in tuples too) get gradients; other arguments
    (masks, offsets, flags) are constants."""
    cls = type(layer)
    forward = cls.__call__

    def checkpointed(module, *args, **kwargs):
        params = tree_flatten(module.trainable_parameters())
        names = [k for k, _ in params]
        n = len(params)
        arrays = []
        skeleton = _take_arrays(args, arrays, _floating)
        out_skeleton = []

        def run(*xs):
            module.update(tree_unflatten(list(zip(names, xs[:n]))))
            flat = []
            out_skeleton[:] = [
                _take_arrays(
                    forward(module, *_put_arrays(skeleton, xs[n:]), **kwargs), flat, lambda a: True
                )
            ]
            return flat

        fn = mx.custom_function(run)

        @fn.vjp
        def recompute(primals, cotangents, outputs):
            # the recomputation waits for the backward pass to reach this layer (mx.checkpoint)
            primals = mx.depends(list(primals), list(outputs))
            _, grads = mx.vjp(run, primals, list(cotangents))
            if n:  # the input gradients after the parameter gradients (module docstring)
                grads = grads[:n] + mx.depends(grads[n:], grads[:n])
            return grads

        flat = fn(*[v for _, v in params], *arrays)
        return _put_arrays(out_skeleton[0], flat)

    cls.__call__ = checkpointed

    def undo():
        cls.__call__ = forward

    return undo
