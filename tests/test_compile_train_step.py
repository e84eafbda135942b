"""A whole training step (model forward, ``DenoiseDiffusion.loss``, backward) under
``torch.compile(fullgraph=True, dynamic=True)`` with inductor: one graph for every batch size.

The backward is INSIDE the compiled function. Dynamo traces ``loss.backward()`` only with
``torch._dynamo.config.trace_autograd_ops = True`` (torch 2.13; without it fullgraph=True
raises "Unsupported Tensor.backward() call", and ``compiled_autograd`` does not change that);
it rewrites the call as ``torch.autograd.grad`` plus the accumulation into ``.grad``, and
AOTAutograd traces the fused ops' registered backwards into the same graph.
benchmarks/compile_step.py builds the step (and times it in benchmarks/goals.py).
"""
import os
import sys

import torch
import torch._dynamo
from torch._dynamo.utils import counters

import fastddpm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.compile_step import ConvEpsModel, compile_training_step, training_step  # noqa: E402

N_STEPS = 1000
BATCHES = (3, 5, 7, 9, 11)  # no other size of x0 (2, 6, 6) equals a batch


def test_training_step_compiles_to_one_graph_for_every_batch_size():
    torch._dynamo.reset()
    counters.clear()
    graphs = []

    def counting_inductor(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx
        compiled = compile_fx(gm, example_inputs)  # may raise to restart the trace
        graphs.append(gm)  # counted once compiled
        return compiled

    torch.manual_seed(0)
    model = ConvEpsModel(2, N_STEPS)
    d = fastddpm.DenoiseDiffusion(model, N_STEPS, backend="cpu")
    params = list(model.parameters())
    eager_step = training_step(d.loss)
    compiled_step = compile_training_step(d.loss, params, backend=counting_inductor)
    gen = torch.Generator().manual_seed(4)
    for i, batch in enumerate(BATCHES):
        x0 = torch.randn(batch, 2, 6, 6, generator=gen)
        results = []
        for compiled in (False, True):
            torch.manual_seed(batch)  # the same seed, so the same t and noise
            if not compiled:
                for p in params:
                    p.grad = None
                loss = eager_step(x0)
            elif i == 0:
                loss = compiled_step(x0)  # compiles
            else:  # a recompile for a new batch size fails the test
                with torch.compiler.set_stance("fail_on_recompile"):
                    loss = compiled_step(x0)
            assert loss.grad_fn is None
            results.append((loss, [p.grad.clone() for p in params]))
        torch.testing.assert_close(results[1], results[0])
        assert all(g.abs().sum() > 0 for g in results[1][1])
    # One graph, compiled once, holds the forward and the backward of every batch size.
    assert len(graphs) == 1
    assert counters["stats"]["unique_graphs"] == 1
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.autograd.grad in targets
    # the fused training-step ops: t, noise and x_t in one call, the mean MSE in another
    assert torch.ops.fastddpm.train_inputs.default in targets
    assert torch.ops.fastddpm.mse_loss.default in targets
    assert counters["graph_break"] == {}
