"""Every bad input to the pooling ops gets a clear error naming the argument and the value."""
import pytest
import torch

import lattice  # noqa: F401
from lattice.ops import use_backend, jagged_embedding_pool, jagged_embedding_pool_fused

ops = torch.ops.lattice


def good(index_dtype=torch.int64):
    w = torch.randn(9, 4)
    tro = torch.tensor([0, 4, 9])  # table 0: 4 rows, table 1: 5 rows
    idx = torch.tensor([0, 3, 1, 4, 2], dtype=index_dtype)
    offs = torch.tensor([0, 2, 3, 3, 5], dtype=index_dtype)  # T=2, B=2
    return w, tro, idx, offs


def fwd(w, tro, idx, offs, pooling=0, psw=None):
    return ops.jagged_embedding_pool(w, tro, idx, offs, pooling, psw)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_index_out_of_range_names_table_position_value(index_dtype):
    w, tro, idx, offs = good(index_dtype)
    idx[2] = 4  # position 2 is table 0, sample 1: 4 rows
    with pytest.raises(RuntimeError, match=r"indices\[2\] = 4 is out of range for table 0 with 4 rows \(sample 1\)"):
        fwd(w, tro, idx, offs)
    w, tro, idx, offs = good(index_dtype)
    idx[4] = 5  # table 1 has 5 rows
    with pytest.raises(RuntimeError, match=r"indices\[4\] = 5 is out of range for table 1 with 5 rows"):
        fwd(w, tro, idx, offs)


def test_negative_index():
    w, tro, idx, offs = good()
    idx[3] = -2
    with pytest.raises(RuntimeError, match=r"indices\[3\] = -2 is negative \(table 1, sample 1\)"):
        fwd(w, tro, idx, offs)


def test_offsets_must_start_at_zero():
    w, tro, idx, offs = good()
    offs[0] = 1
    with pytest.raises(RuntimeError, match=r"offsets\[0\] must be 0, got 1"):
        fwd(w, tro, idx, offs)


def test_offsets_must_not_decrease():
    w, tro, idx, offs = good()
    offs[2] = 1
    with pytest.raises(RuntimeError, match=r"offsets must be non-decreasing: bag 1 has offsets\[1\] = 2 > offsets\[2\] = 1"):
        fwd(w, tro, idx, offs)


def test_offsets_must_not_overrun_indices():
    w, tro, idx, offs = good()
    offs[-1] = 6
    with pytest.raises(RuntimeError, match=r"offsets\[-1\] = 6 overruns indices \(5 entries\)"):
        fwd(w, tro, idx, offs)


def test_offsets_size_must_be_T_times_B_plus_1():
    w, tro, idx, offs = good()
    with pytest.raises(RuntimeError, match=r"offsets must have T\*B\+1 entries with T=2 tables .* got 4"):
        fwd(w, tro, idx, offs[:4])


def test_dtypes():
    w, tro, idx, offs = good()
    with pytest.raises(RuntimeError, match="offsets must have the same dtype as indices"):
        fwd(w, tro, idx, offs.int())
    with pytest.raises(RuntimeError, match="indices must be int32 or int64, got Float"):
        fwd(w, tro, idx.float(), offs.float())
    with pytest.raises(RuntimeError, match="table_row_offsets must be int64, got Int"):
        fwd(w, tro.int(), idx, offs)
    with pytest.raises(RuntimeError, match="weights must be float32, bfloat16, float16 or float64, got Long"):
        fwd(w.long(), tro, idx, offs)
    with pytest.raises(RuntimeError, match="per_sample_weights must be floating point, got Long"):
        fwd(w, tro, idx, offs, 0, torch.ones(5, dtype=torch.long))


def test_shapes():
    w, tro, idx, offs = good()
    with pytest.raises(RuntimeError, match=r"weights must be 2-D, got shape \[36\]"):
        fwd(w.flatten(), tro, idx, offs)
    with pytest.raises(RuntimeError, match=r"indices must be 1-D"):
        fwd(w, tro, idx.view(5, 1), offs)
    with pytest.raises(RuntimeError, match=r"offsets must be 1-D"):
        fwd(w, tro, idx, offs.view(5, 1))
    with pytest.raises(RuntimeError, match=r"table_row_offsets must be \[T\+1\] \(packed tables\) or \[T, 2\]"):
        fwd(w, torch.zeros(2, 3, dtype=torch.long), idx, offs)
    with pytest.raises(RuntimeError, match=r"table_row_offsets must have T\+1 >= 2 entries, got 1"):
        fwd(w, tro[:1], idx, offs)
    with pytest.raises(RuntimeError, match=r"per_sample_weights must have one entry per index \(5\), got 4"):
        fwd(w, tro, idx, offs, 0, torch.ones(4))


def test_table_row_offsets_ranges():
    w, tro, idx, offs = good()
    with pytest.raises(RuntimeError, match=r"table 1 spans rows \[4, 10\), which is not a valid range of weights' 9 rows"):
        fwd(w, torch.tensor([0, 4, 10]), idx, offs)
    with pytest.raises(RuntimeError, match=r"table 0 spans rows \[5, 4\)"):
        fwd(w, torch.tensor([[5, 4], [4, 9]]), idx, offs)
    with pytest.raises(RuntimeError, match=r"table 0 spans rows \[-1, 4\)"):
        fwd(w, torch.tensor([-1, 4, 9]), idx, offs)


def test_pooling_value_and_weights_with_mean():
    w, tro, idx, offs = good()
    with pytest.raises(RuntimeError, match=r"pooling must be 0 \(sum\) or 1 \(mean\), got 2"):
        fwd(w, tro, idx, offs, 2)
    with pytest.raises(RuntimeError, match=r"per_sample_weights are only supported with sum pooling \(pooling=0\), got pooling=1 \(mean\)"):
        fwd(w, tro, idx, offs, 1, torch.ones(5))


def test_backward_ops_validate_too():
    w, tro, idx, offs = good()
    grad = torch.randn(2, 2, 4)
    with pytest.raises(RuntimeError, match=r"grad_output must have shape \[B, T, D\] = \[2, 2, 4\], got \[1, 2, 4\]"):
        ops.jagged_embedding_pool_backward_sparse(grad[:1], tro, idx, offs, 0, None)
    with pytest.raises(RuntimeError, match=r"grad_output must have shape"):
        ops.jagged_embedding_pool_backward_per_sample_weights(grad[:1], w, tro, idx, offs)
    bad = idx.clone()
    bad[0] = 7
    with pytest.raises(RuntimeError, match=r"indices\[0\] = 7 is out of range for table 0"):
        ops.jagged_embedding_pool_backward_sparse(grad, tro, bad, offs, 0, None)
    with pytest.raises(RuntimeError, match=r"indices\[0\] = 7 is out of range for table 0"):
        ops.jagged_embedding_pool_backward_per_sample_weights(grad, w, tro, bad, offs)
    with pytest.raises(RuntimeError, match=r"indices\[0\] = 7 is out of range for table 0"):
        ops.jagged_embedding_pool_backward_fused_(w, torch.zeros(9), grad, tro, bad, offs, 0, None, 1, 0.1, 1e-8, 0.0)


def test_fused_optimizer_arguments():
    w, tro, idx, offs = good()
    grad = torch.randn(2, 2, 4)

    def fused(w=w, state=torch.zeros(9), optimizer=1, lr=0.1, eps=1e-8, wd=0.0):
        ops.jagged_embedding_pool_backward_fused_(w, state, grad, tro, idx, offs, 0, None, optimizer, lr, eps, wd)

    with pytest.raises(RuntimeError, match=r"optimizer must be 0 \(SGD\) or 1 \(row-wise Adagrad\), got 3"):
        fused(optimizer=3)
    with pytest.raises(RuntimeError, match=r"optimizer_state must be \[rows_total\] = \[9\] for row-wise Adagrad, got shape \[8\]"):
        fused(state=torch.zeros(8))
    with pytest.raises(RuntimeError, match="optimizer_state must be float32, got Double"):
        fused(state=torch.zeros(9, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="eps must be finite and > 0 for row-wise Adagrad, got 0"):
        fused(eps=0.0)
    with pytest.raises(RuntimeError, match="learning_rate must be finite, got nan"):
        fused(lr=float("nan"))
    with pytest.raises(RuntimeError, match="weight_decay must be finite and >= 0, got -1"):
        fused(wd=-1.0)
    with pytest.raises(RuntimeError, match="weights must be contiguous to be updated in place"):
        fused(w=torch.randn(4, 9).t())
    fused(state=torch.empty(0), optimizer=0)  # SGD ignores the state


def test_rows_step_arguments():
    w = torch.randn(9, 4)
    s = torch.zeros(9)
    with pytest.raises(RuntimeError, match=r"rows must be unique: rows\[2\] = 1 appears twice"):
        ops.sparse_rows_optimizer_step_(w, s, torch.tensor([1, 5, 1]), torch.randn(3, 4), 1, 0.1, 1e-8, 0.0)
    with pytest.raises(RuntimeError, match=r"rows\[1\] = 9 is out of range for weights with 9 rows"):
        ops.sparse_rows_optimizer_step_(w, s, torch.tensor([1, 9]), torch.randn(2, 4), 1, 0.1, 1e-8, 0.0)
    with pytest.raises(RuntimeError, match=r"row_grads must have shape \[U, D\] = \[2, 4\], got \[2, 3\]"):
        ops.sparse_rows_optimizer_step_(w, s, torch.tensor([1, 2]), torch.randn(2, 3), 1, 0.1, 1e-8, 0.0)


def test_bad_input_never_writes_out_of_bounds_at_scale():
    # One bad index among a million: the parallel pass flags it and the report names the first.
    w = torch.randn(1000, 16)
    idx = torch.randint(0, 500, (1_000_000,))
    idx[777_777] = 500
    offs = torch.arange(0, 1_000_001, 100)
    tro = torch.tensor([0, 500, 1000])  # T=2, B=5000
    with pytest.raises(RuntimeError, match=r"indices\[777777\] = 500 is out of range for table 1 with 500 rows"):
        fwd(w, tro, idx, offs)


def test_reference_backend_reports_bad_indices():
    w, tro, idx, offs = good()
    idx[2] = 4
    with use_backend("reference"), pytest.raises(RuntimeError, match=r"indices\[2\] = 4 is out of range for table 0"):
        jagged_embedding_pool(w, tro, idx, offs)


def test_fused_front_end_rejects_weights_that_require_grad():
    w, tro, idx, offs = good()
    with pytest.raises(ValueError, match="must not require grad"):
        jagged_embedding_pool_fused(w.requires_grad_(), torch.zeros(9), tro, idx, offs)
