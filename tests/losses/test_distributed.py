"""Two CPU processes on gloo: the regulariser is a statistic of the global batch."""

import torch
from torch import nn

from lowres_ssl.losses import SFRIKLoss, gather_with_grad
from tests.distributed_harness import run_distributed

N_PER_RANK, DIM_IN, Q = 12, 6, 10


def make_batch_and_model():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(2 * N_PER_RANK, DIM_IN, generator=g, dtype=torch.float64)
    x2 = x1 + 0.2 * torch.randn(2 * N_PER_RANK, DIM_IN, generator=g, dtype=torch.float64)
    torch.manual_seed(1)
    model = nn.Linear(DIM_IN, Q).double()
    return x1, x2, model


def loss_and_grads(model, x1, x2, path):
    model.zero_grad()
    loss_fn = SFRIKLoss(mmd_path=path, block_size=5)
    loss = loss_fn(model(x1), model(x2))
    loss.backward()
    return loss.detach(), loss_fn.terms["mmd"], [p.grad.clone() for p in model.parameters()]


def sfrik_worker(rank, world, path):
    x1, x2, model = make_batch_and_model()
    rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
    loss, mmd, grads = loss_and_grads(model, x1[rows], x2[rows], path)
    for g in grads:  # what DistributedDataParallel does to parameter gradients
        torch.distributed.all_reduce(g)
        g /= world
    return {"loss": loss, "mmd": mmd, "grads": grads}


def test_sfrik_two_processes_equal_one_process_on_the_whole_batch():
    for path in ("dense", "blocked"):
        results = run_distributed(sfrik_worker, 2, path)
        x1, x2, model = make_batch_and_model()
        loss, mmd, grads = loss_and_grads(model, x1, x2, path)
        # float64; only summation order differs between the runs.
        mean_loss = sum(r["loss"] for r in results) / 2
        torch.testing.assert_close(mean_loss, loss, rtol=1e-12, atol=0)
        for r in results:  # the MMD term is the global one on every rank
            torch.testing.assert_close(r["mmd"], mmd, rtol=1e-12, atol=0)
            for got, want in zip(r["grads"], grads, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def gather_worker(rank, world):
    # Unequal local batches (a short last batch): 3 rows on rank 0, 5 on rank 1.
    x = torch.arange(8 * 2, dtype=torch.float64).reshape(8, 2)
    local = (x[:3] if rank == 0 else x[3:]).clone().requires_grad_()
    gathered = gather_with_grad(local)
    weights = torch.arange(1, 17, dtype=torch.float64).reshape(8, 2) * (rank + 1)
    (gathered * weights).sum().backward()
    return {"gathered": gathered.detach(), "grad": local.grad}


def test_gather_with_unequal_sizes_concatenates_and_sums_gradients():
    results = run_distributed(gather_worker, 2)
    x = torch.arange(16, dtype=torch.float64).reshape(8, 2)
    weights = torch.arange(1, 17, dtype=torch.float64).reshape(8, 2)
    summed = weights * 1 + weights * 2  # each rank's loss weights the rows by (rank + 1)
    for r in results:
        torch.testing.assert_close(r["gathered"], x)
    torch.testing.assert_close(results[0]["grad"], summed[:3])
    torch.testing.assert_close(results[1]["grad"], summed[3:])


def test_gather_is_identity_in_one_process():
    x = torch.randn(3, 4)
    assert gather_with_grad(x) is x
