"""The Plan API: packing, positions, predictors, grouping, and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import shared_prefix as sp

# The one-level layout, [prompts | completions]; test_tree.py tests prefix trees.
pytestmark = pytest.mark.usefixtures("prompts_only")


def batch():
    # Rows 0 and 2 share a prompt (left-padded differently); row 1 has its own; row 3 has an empty completion.
    pid = torch.tensor([[0, 5, 6, 7], [9, 9, 3, 4], [0, 5, 6, 7], [1, 3, 4, 4]])
    pmask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    cid = torch.tensor([[10, 11, 0], [12, 0, 0], [13, 14, 15], [0, 0, 0]])
    cmask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    return pid, pmask, cid, cmask


def test_layout_positions_and_groups():
    p = sp.plan(*batch())
    assert p.group_sizes == [2, 1, 1]
    assert p.row_group == [0, 1, 0, 2]
    # [5 6 7 | 3 4 | 1 3 4 4 | 10 11 13 14 15 | 12]
    assert p.input_ids.tolist() == [[5, 6, 7, 3, 4, 1, 3, 4, 4, 10, 11, 13, 14, 15, 12]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 3, 4, 3, 4, 5, 2]]
    assert p.num_tokens == 15
    assert p.stock_tokens == (3 + 2) + (2 + 1) + (3 + 3) + (4 + 0)
    assert p.max_seqlen == 6
    assert p.input_ids.dtype == torch.long and p.position_ids.dtype == torch.long


def test_plan_is_a_value():
    """A plan holds no state of any forward: its fields cannot be set, and attention on it changes nothing in it."""
    p = sp.plan(*batch())
    for name in ("num_tokens", "attention_calls", "input_ids"):
        with pytest.raises(AttributeError, match="immutable"):
            setattr(p, name, 0)
    before = {name: getattr(p, name) for name in ("num_tokens", "group_sizes", "windows", "max_seqlen")}
    q = torch.randn(p.num_tokens, 2, 4, dtype=torch.float64, requires_grad=True)
    sp.attention(q, q, q, p).sum().backward()
    assert not hasattr(p, "__dict__") and {name: getattr(p, name) for name in before} == before


def test_pack_is_differentiable_and_predictors():
    pid, pmask, cid, cmask = batch()
    p = sp.plan(pid, pmask, cid, cmask)
    pe = torch.randn(4, 4, 3, dtype=torch.float64, requires_grad=True)
    ce = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    packed = p.pack(pe, ce)
    assert packed.shape == (1, 15, 3)
    assert torch.equal(packed[0, 0], pe[0, 1]) and torch.equal(packed[0, 9], ce[0, 0])
    packed.sum().backward()
    # Shared prompt tokens come from the first row of the group only; padding gets no gradient.
    assert pe.grad[0, 1:].eq(1).all() and pe.grad[2].eq(0).all() and pe.grad[0, 0].eq(0).all()
    assert ce.grad[cmask.bool()].eq(1).all() and ce.grad[~cmask.bool()].eq(0).all()

    hidden = torch.arange(15.0, dtype=torch.float64).repeat_interleave(2).view(1, 15, 2).requires_grad_()
    pred = p.predictors(hidden)
    assert pred.shape == (4, 3, 2)
    # Row 0: first token predicted by the prompt's last token (packed 2), then by itself (9).
    assert pred[0, :, 0].tolist() == [2, 9, 0]
    assert pred[2, :, 0].tolist() == [2, 11, 12]
    assert pred[1, :, 0].tolist() == [4, 0, 0]
    assert pred[3].eq(0).all()
    assert torch.equal(p.predictors(hidden[0]), pred)
    pred.sum().backward()
    assert hidden.grad[0, :, 0].tolist() == [0, 0, 2, 0, 1, 0, 0, 0, 0, 1, 0, 1, 1, 0, 0]


def test_group_options():
    pid, pmask, cid, cmask = batch()
    assert sp.plan(pid, pmask, cid, cmask, group_sizes=1).group_sizes == [1, 1, 1, 1]
    assert sp.plan(pid, pmask, cid, cmask, group_ids=["a", "b", "a", "c"]).group_sizes == [2, 1, 1]
    assert sp.plan(pid, pmask, cid, cmask, group_ids=torch.tensor([7, 8, 7, 9])).row_group == [0, 1, 0, 2]
    # A list of 0-d tensors groups by value (tensors themselves hash by identity).
    assert sp.plan(pid, pmask, cid, cmask, group_ids=list(torch.tensor([7, 8, 7, 9]))).row_group == [0, 1, 0, 2]
    assert sp.plan(pid, pmask, cid, cmask, group_ids=np.array(["u", "v", "u", "w"], dtype=object)).group_sizes == [2, 1, 1]
    # Declared groups that split identical prompts are allowed (no sharing across them).
    assert sp.plan(pid, pmask, cid, cmask, group_ids=[1, 2, 3, 4]).num_tokens == 3 + 2 + 3 + 4 + 6
    same = pid[[0, 0, 0, 0]], pmask[[0, 0, 0, 0]]
    assert sp.plan(*same, cid, cmask, group_sizes=[2, 2]).group_sizes == [2, 2]
    assert sp.plan(*same, cid, cmask, group_sizes=2).group_sizes == [2, 2]


class TestBadInputs:
    def test_rows_and_shapes(self):
        pid, pmask, cid, cmask = batch()
        with pytest.raises(ValueError, match="completion_ids: has 3 rows"):
            sp.plan(pid, pmask, cid[:3], cmask[:3])
        with pytest.raises(ValueError, match="prompt_mask: shape"):
            sp.plan(pid, pmask[:, :3], cid, cmask)
        with pytest.raises(ValueError, match="completion_mask: shape"):
            sp.plan(pid, pmask, cid, cmask[:, :2])
        with pytest.raises(ValueError, match="prompt_ids: expected a 2-D"):
            sp.plan(pid[0], pmask[0], cid, cmask)

    def test_types(self):
        pid, pmask, cid, cmask = batch()
        with pytest.raises(TypeError, match="prompt_ids: expected an integer"):
            sp.plan(pid.float(), pmask, cid, cmask)
        with pytest.raises(TypeError, match="completion_ids: expected an integer"):
            sp.plan(pid, pmask, cid.double(), cmask)
        with pytest.raises(TypeError, match="prompt_mask: expected a bool or integer"):
            sp.plan(pid, pmask.float(), cid, cmask)
        with pytest.raises(TypeError, match="prompt_ids: expected a torch.Tensor"):
            sp.plan(pid.tolist(), pmask, cid, cmask)
        with pytest.raises(TypeError, match="group_sizes"):
            sp.plan(pid, pmask, cid, cmask, group_sizes="2")
        with pytest.raises(TypeError, match="group_ids"):
            sp.plan(pid, pmask, cid, cmask, group_ids=torch.tensor([1.0, 2.0, 1.0, 3.0]))
        with pytest.raises(TypeError, match="group_ids"):
            sp.plan(pid, pmask, cid, cmask, group_ids=[[1], [2], [1], [3]])  # unhashable
        with pytest.raises(TypeError, match="group_ids"):
            sp.plan(pid, pmask, cid, cmask, group_ids=torch.tensor([0j, 1j, 0j, 2j]))  # the imaginary part matters
        with pytest.raises(TypeError, match="group_ids: a list of tensors"):
            sp.plan(pid, pmask, cid, cmask, group_ids=[torch.tensor([1]), 2, 1, 3])
        for dtype in (torch.uint16, torch.uint32, torch.uint64):  # no gather takes them
            with pytest.raises(TypeError, match="prompt_ids: expected an integer tensor"):
                sp.plan(pid.to(dtype), pmask, cid, cmask)
        with pytest.raises(ValueError, match="prompt_ids: expected a cpu or cuda tensor"):
            sp.plan(pid.to("meta"), pmask.to("meta"), cid.to("meta"), cmask.to("meta"))

    def test_rows_and_groups(self):
        pid, pmask, cid, cmask = batch()
        empty = pmask.clone()
        empty[1] = False
        with pytest.raises(ValueError, match="prompt_mask: row 1 has no valid prompt token"):
            sp.plan(pid, empty, cid, cmask)
        holes = cmask.clone()
        holes[2, 1] = 0
        with pytest.raises(ValueError, match="completion_mask: the valid tokens of row 2"):
            sp.plan(pid, pmask, cid, holes)
        with pytest.raises(ValueError, match="group_sizes: sizes sum to 3 but the batch has 4 rows"):
            sp.plan(pid, pmask, cid, cmask, group_sizes=[2, 1])
        with pytest.raises(ValueError, match="group_sizes: 3 does not divide"):
            sp.plan(pid, pmask, cid, cmask, group_sizes=3)
        with pytest.raises(ValueError, match="group_sizes: every group size"):
            sp.plan(pid, pmask, cid, cmask, group_sizes=[4, 0])
        with pytest.raises(ValueError, match="group_sizes: rows 0 and 1 are declared one group"):
            sp.plan(pid, pmask, cid, cmask, group_sizes=[2, 2])
        with pytest.raises(ValueError, match="group_ids: rows 0 and 1"):
            sp.plan(pid, pmask, cid, cmask, group_ids=[1, 1, 1, 2])
        with pytest.raises(ValueError, match="group_ids: has 3 elements"):
            sp.plan(pid, pmask, cid, cmask, group_ids=[1, 2, 3])
        with pytest.raises(ValueError, match="at most one"):
            sp.plan(pid, pmask, cid, cmask, group_sizes=1, group_ids=[1, 2, 3, 4])
        # Sizes whose sum would wrap around in the planner's unsigned arithmetic.
        for sizes in ([2**64 - 1, 5], [2, 2**64 - 1, 3], [2, 2**64 - 2]):
            with pytest.raises(ValueError, match="group_sizes: sizes sum to"):
                sp.plan(pid, pmask, cid, cmask, group_sizes=sizes)
        import itertools  # an endless iterable of ids stops at one more than the rows

        with pytest.raises(ValueError, match="group_ids: has more than 4 elements"):
            sp.plan(pid, pmask, cid, cmask, group_ids=itertools.repeat(0))

    def test_pack_shapes(self):
        p = sp.plan(*batch())
        with pytest.raises(ValueError, match="prompt_x"):
            p.pack(torch.zeros(4, 5), torch.zeros(4, 3))
        with pytest.raises(ValueError, match="completion_x: trailing shape"):
            p.pack(torch.zeros(4, 4, 2), torch.zeros(4, 3, 3))
        with pytest.raises(ValueError, match="hidden"):
            p.predictors(torch.zeros(1, 14, 2))

    def test_pack_promotes_dtypes(self):
        """Mixed dtypes promote as torch.cat does: an int prompt with fractional completion values keeps them."""
        p = sp.plan(*batch())
        packed = p.pack(torch.ones(4, 4, dtype=torch.int64), torch.full((4, 3), 0.75))
        assert packed.dtype == torch.float32 and packed[0, p.prefix_tokens:].eq(0.75).all()
        mixed = p.pack(torch.ones(4, 4, dtype=torch.bfloat16), torch.full((4, 3), 1.001, dtype=torch.float32))
        assert mixed.dtype == torch.float32 and mixed[0, p.prefix_tokens:].eq(1.001).all()


def long_plan(prompt_lens, completion_len=64, group=4):
    """One group of ``group`` equal completions per prompt (prompt lengths may differ; padded on the left)."""
    width = max(prompt_lens)
    pid = torch.randint(1, 100, (len(prompt_lens) * group, width))
    pmask = torch.zeros_like(pid, dtype=torch.bool)
    for i, n in enumerate(prompt_lens):
        pid[i * group : (i + 1) * group] = pid[i * group]
        pmask[i * group : (i + 1) * group, width - n :] = True
    cid = torch.randint(1, 100, (len(prompt_lens) * group, completion_len))
    return sp.plan(pid, pmask, cid, torch.ones_like(cid, dtype=torch.bool), group_sizes=group)


FUSED_FLASH = {"prefix+completions": "flash", "completions_x_prefix": "flash"}
CUDNN_PREFIX = {"prefix": "cudnn", "completions_x_prefix": "cudnn", "completions": "flash"}


@pytest.fixture
def fresh_shapes():
    """The counts of shapes are process-wide: start from none, and leave none behind."""
    sp._core._forget_shapes()
    yield
    sp._core._forget_shapes()


def test_auto_kernels_wait_for_a_recurring_shape(fresh_shapes):
    """cuDNN (which builds a graph per new shape) takes a long one-batch call only once its shape recurred in 8
    earlier plans (the default); until then flash-attention 2 runs the prefixes and completions as one call."""
    for _ in range(8):
        assert long_plan([9011]).auto_kernels == FUSED_FLASH
    recurred = long_plan([9011])
    assert recurred.auto_kernels == CUDNN_PREFIX
    with sp.cudnn_after(3):
        assert long_plan([9013]).auto_kernels == FUSED_FLASH  # another length: a new shape
        for _ in range(2):
            long_plan([9013])
        assert long_plan([9013]).auto_kernels == CUDNN_PREFIX
        # The count is per call: another completion length is a new shape for the cross call (its keys are the
        # prefix's), while the prefix's own shape recurred.
        assert long_plan([9011], completion_len=32).auto_kernels == {
            "prefix": "cudnn", "completions_x_prefix": "flash", "completions": "flash"}
    # Fixed when the plan is made: neither leaving the block nor forgetting the counts changes an existing plan.
    sp._core._forget_shapes()
    assert recurred.auto_kernels == CUDNN_PREFIX and long_plan([9011]).auto_kernels == FUSED_FLASH


def test_auto_kernels_count_a_bucket_as_one_shape(fresh_shapes):
    """With ``cudnn_bucket``, prompt lengths padded to the same bucket are one shape (one cuDNN graph)."""
    with sp.cudnn_after(1):
        assert long_plan([9031]).auto_kernels == FUSED_FLASH
        assert long_plan([9033]).auto_kernels == FUSED_FLASH  # unpadded: another shape
        with sp.cudnn_bucket(512):
            assert long_plan([9035]).auto_kernels == FUSED_FLASH  # the first plan of bucket 9216
            # The prefix call's bucket recurred; the cross call (completions against the prefix's keys, not padded:
            # padded keys would be seen) has a new key length.
            prefix_only = {"prefix": "cudnn", "completions_x_prefix": "flash", "completions": "flash"}
            assert long_plan([9037]).auto_kernels == prefix_only
            assert long_plan([9216]).auto_kernels == prefix_only  # a multiple: the same graph, unpadded
            assert long_plan([9217]).auto_kernels == FUSED_FLASH  # the next bucket


def test_auto_kernels_at_once_and_never(fresh_shapes):
    with sp.cudnn_after(0):
        assert long_plan([9019]).auto_kernels == CUDNN_PREFIX
        # Several runs (prompts of two lengths) or fewer than 8192 keys: never cuDNN.
        assert long_plan([9021, 9023]).auto_kernels == FUSED_FLASH
        assert long_plan([8191]).auto_kernels == FUSED_FLASH
        with sp._kernels.self_calls("split"):
            assert long_plan([100]).auto_kernels == {"prefix": "flash", "completions_x_prefix": "flash",
                                                     "completions": "flash"}
        no_completions = sp.plan(torch.ones(1, 9029, dtype=torch.long), torch.ones(1, 9029, dtype=torch.bool),
                                 torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, dtype=torch.bool))
        assert no_completions.auto_kernels == {"prefix": "cudnn"}


def test_cudnn_after_rejects_bad_values_and_restores():
    before = sp._core.set_cudnn_after(8)
    try:
        for bad in (-1, 1.5, True, "3", 2**32):
            with pytest.raises(ValueError, match="plans"):
                with sp.cudnn_after(bad):
                    pass
            with pytest.raises(ValueError, match="tokens"):
                with sp.cudnn_bucket(bad):
                    pass
        with pytest.raises(RuntimeError):
            with sp.cudnn_after(0):
                raise RuntimeError("inside")
        assert sp._core.set_cudnn_after(8) == 8
    finally:
        sp._core.set_cudnn_after(before)


def test_import_refuses_an_extension_built_for_another_torch():
    """The build records its torch; importing the package under another torch minor version raises ImportError
    naming both and the rebuild command, before the extension is loaded (which could fail on missing symbols or
    crash). A fresh process where the record says 2.99."""
    import subprocess
    import sys

    script = (
        "import sys, types, torch\n"
        "record = types.ModuleType('shared_prefix._build_info'); record.TORCH_VERSION = '2.99'\n"
        "sys.modules['shared_prefix._build_info'] = record\n"
        "try:\n"
        "    import shared_prefix\n"
        "except ImportError as e:\n"
        "    assert 'shared_prefix._core' not in sys.modules\n"
        "    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "built for torch 2.99" in proc.stdout and torch.__version__ in proc.stdout, proc.stdout
    assert "pip install --no-build-isolation" in proc.stdout
    import shared_prefix
    from shared_prefix import _core

    assert shared_prefix._torch_check.minor(_core.TORCH_VERSION) == shared_prefix._torch_check.built_for()
