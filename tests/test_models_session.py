"""The lane-batch models (HierTCN, HierGRU, HRNN, SessionGRU): shapes, causality, state carrying and
resets, and HierTCN's fused path against backend='reference'."""

import pytest
import torch

from hiertcn_fast.evaluate import batch_targets
from hiertcn_fast.models import HRNN, HierGRU, HierTCN, SessionGRU
from model_helpers import lane_batch, random_sessions, one_thread  # noqa: F401 (autouse fixture)

NUM_ITEMS = 31


def make(name, **kwargs):
    torch.manual_seed(11)
    if name == "hiertcn":
        return HierTCN(NUM_ITEMS, embedding_dim=10, state_layers=2, state_hidden=6, tcn_channels=(8, 9),
                       kernel_size=3, dilations=(1, 2), **kwargs)
    if name == "hiergru":
        return HierGRU(NUM_ITEMS, embedding_dim=10, state_layers=2, state_hidden=6, session_hidden=9, **kwargs)
    if name == "hrnn":
        return HRNN(NUM_ITEMS, embedding_dim=10, user_layers=1, user_hidden=6, session_hidden=9, **kwargs)
    return SessionGRU(NUM_ITEMS, embedding_dim=10, hidden=9, **kwargs)


MODELS = ["hiertcn", "hiergru", "hrnn", "session_gru"]
STATEFUL = ["hiertcn", "hiergru", "hrnn"]


def features_of(model, batch, state=None):
    with torch.no_grad():
        return model.double()(batch, state)


@pytest.mark.parametrize("name", MODELS)
def test_shapes_and_event_order(name):
    model = make(name).double()
    generator = torch.Generator().manual_seed(0)
    batch = lane_batch(random_sessions(generator, NUM_ITEMS, lanes=5), width=9)
    features, state = model(batch, None)
    targets = batch_targets(batch)
    assert features.shape == (targets["targets"].shape[0], model.output.in_features)
    assert model.scores(features).shape == (features.shape[0], NUM_ITEMS + 1)
    if model.state_shape is None:
        assert state is None
    else:
        assert state.shape == (model.state_shape[0], 5, model.state_shape[1])
    # The loss backpropagates to every parameter.
    torch.nn.functional.cross_entropy(model.scores(features), targets["targets"]).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", MODELS)
def test_no_future_leak(name):
    """Changing item p of a session changes no prediction made before it was seen: not the earlier
    positions of that session, not earlier sessions, not other lanes."""
    model = make(name)
    sessions = [[[1, 2, 3, 4, 5], [6, 7, 8]], [[9, 10], [11, 12, 13, 14]], [[15, 16, 17]]]
    base = lane_batch(sessions)
    changed_sessions = [[list(s) for s in lane] for lane in sessions]
    changed_sessions[0][0][2] = 30  # lane 0, session 0, item 3 (predicted at position 2)
    changed = lane_batch(changed_sessions)
    before, _ = features_of(model, base)
    after, _ = features_of(model, changed)
    fields = batch_targets(base)
    mask = fields["mask"]
    step, lane, position = torch.nonzero(mask, as_tuple=True)
    may_change = (lane == 0) & ((step > 0) | (position >= 3))
    if name == "session_gru":
        may_change &= step == 0
    torch.testing.assert_close(after[~may_change], before[~may_change])
    assert not torch.allclose(after[may_change & (step == 0)], before[may_change & (step == 0)])
    if name in STATEFUL:  # the next session sees the change through the state
        assert not torch.allclose(after[(lane == 0) & (step == 1)], before[(lane == 0) & (step == 1)])


@pytest.mark.parametrize("name", STATEFUL)
def test_state_carried_between_batches_equals_one_batch(name):
    """Four sessions of each lane in one batch == two batches of two with the state carried."""
    model = make(name)
    generator = torch.Generator().manual_seed(3)
    lanes = [[torch.randint(1, NUM_ITEMS + 1, (int(n),), generator=generator).tolist()
              for n in torch.randint(1, 6, (4,), generator=generator)] for _ in range(3)]
    whole, whole_state = features_of(model, lane_batch(lanes))
    first = lane_batch([lane[:2] for lane in lanes], keep_last=True)
    second = lane_batch([lane[2:] for lane in lanes], continues=torch.ones(3, dtype=torch.bool), index=1)
    part1, state = features_of(model, first)
    part2, final = features_of(model, second, state)
    # Reorder: the batches list events step-major, so interleave back by (step, lane).
    split = [batch_targets(b)["mask"] for b in (first, second)]
    width = max(m.shape[2] for m in split)
    full = torch.zeros(4, 3, width, part1.shape[1], dtype=part1.dtype)
    full[:2, :, :split[0].shape[2]][split[0]] = part1
    full[2:, :, :split[1].shape[2]][split[1]] = part2
    mask = torch.zeros(4, 3, width, dtype=torch.bool)
    mask[:2, :, :split[0].shape[2]] = split[0]
    mask[2:, :, :split[1].shape[2]] = split[1]
    torch.testing.assert_close(full[mask], whole)
    torch.testing.assert_close(final, whole_state)


@pytest.mark.parametrize("name", STATEFUL)
def test_user_boundary_resets_state(name):
    """A lane holding user A then user B predicts B's events as if B were alone."""
    model = make(name)
    user_a, user_b = [[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]]
    shared = lane_batch([user_a + user_b])
    shared.keep[1, 0] = False  # user A ends after its second session
    alone = lane_batch([user_b])
    together, _ = features_of(model, shared)
    by_itself, _ = features_of(model, alone)
    events_a = sum(len(s) for s in user_a)
    torch.testing.assert_close(together[events_a:], by_itself)


def test_hiertcn_defaults_are_the_papers():
    model = HierTCN(100)
    assert model.item_embedding.embedding_dim == 128
    assert model.state_shape == (2, 128) and model.context_dim == 256
    assert [b.conv.out_channels for b in model.tcn.blocks] == [128, 128]
    assert [b.conv.kernel_size for b in model.tcn.blocks] == [5, 5]
    assert [b.conv.dilation for b in model.tcn.blocks] == [1, 2]
    assert model.tcn.blocks[0].conv.context_channels == 256
    assert model.max_session_length == 20 and model.output.out_features == 101


def test_hiertcn_fused_equals_reference():
    """Same weights, backend='reference' vs the default (fused) backend: features, state and gradients."""
    generator = torch.Generator().manual_seed(4)
    batch = lane_batch(random_sessions(generator, NUM_ITEMS, lanes=4, max_length=9))
    state = torch.randn(2, 4, 6, dtype=torch.float64, generator=generator)
    results = []
    for backend in (None, "reference"):
        model = make("hiertcn", backend=backend).double()
        features, new_state = model(batch, state)
        (features.square().sum() + new_state.sum()).backward()
        results.append((features, new_state, {n: p.grad for n, p in model.named_parameters()}))
    (f_fast, s_fast, g_fast), (f_ref, s_ref, g_ref) = results
    torch.testing.assert_close(f_fast, f_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s_fast, s_ref, rtol=1e-9, atol=1e-9)
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-8, atol=1e-8, msg=name)


def test_empty_batch_and_errors():
    model = make("hiertcn")
    batch = lane_batch([[[1]]])
    batch.lengths.zero_()
    batch.valid.zero_()
    features, state = model(batch, None)
    assert features.shape == (0, 9) and state.shape == (2, 1, 6)
    with pytest.raises(ValueError, match="state must be"):
        model(lane_batch([[[1, 2]]]), torch.zeros(2, 3, 6))
    with pytest.raises(ValueError, match="tcn_channels"):
        HierTCN(10, tcn_channels=())
    with pytest.raises(ValueError, match="dropout"):
        HierTCN(10, dropout=1.0)
    with pytest.raises(ValueError, match="state=None"):
        make("session_gru")(lane_batch([[[1, 2]]]), torch.zeros(1, 1, 1))
    no_steps = lane_batch([[[1]]])
    no_steps.items, no_steps.lengths = no_steps.items[:0], no_steps.lengths[:0]
    for name in ("hiertcn", "hiergru"):
        with pytest.raises(ValueError, match="at least one step"):
            make(name)(no_steps, None)


def test_length_groups_are_the_cheapest_partition():
    """length_groups against brute force over every partition of the distinct lengths into consecutive
    groups (at most MAX_LENGTH_GROUPS), each run at its longest, plus the per-group overhead."""
    import itertools

    from hiertcn_fast.models import base
    assert base.length_groups([]) == []
    assert base.length_groups([3, 3, 3]) == [3]
    generator = torch.Generator().manual_seed(5)
    for trial in range(60):
        count = int(torch.randint(1, 200, (1,), generator=generator))
        longest = int(torch.randint(1, 21, (1,), generator=generator))
        lengths = torch.randint(1, longest + 1, (count,), generator=generator).tolist()
        widths = base.length_groups(lengths)

        def cost(ends):
            total, low = 0, 0
            for end in ends:
                total += sum(1 for length in lengths if low < length <= end) * end + base.GROUP_OVERHEAD_POSITIONS
                low = end
            return total

        distinct = sorted(set(lengths))
        best = min(cost([*cuts, distinct[-1]]) for k in range(base.MAX_LENGTH_GROUPS)
                   for cuts in itertools.combinations(distinct[:-1], k))
        assert widths == sorted(widths) and widths[-1] == max(lengths) and len(widths) <= base.MAX_LENGTH_GROUPS
        assert set(widths) <= set(lengths)
        assert cost(widths) == best
    # Many distinct lengths: group ends at quantiles, still ending at the longest.
    many = list(range(1, 500))
    widths = base.length_groups(many)
    assert widths[-1] == 499 and 1 < len(widths) <= base.MAX_LENGTH_GROUPS


def test_group_gather_is_the_sessions_first_positions_and_its_gradient():
    """SessionInputs._gather_with_items's groups (every group in one gather, split into views) against slicing each session's
    first positions out of the embeddings: values, and the gradient the embeddings get back."""
    from hiertcn_fast.models.base import SessionInputs
    generator = torch.Generator().manual_seed(5)
    sessions = random_sessions(generator, NUM_ITEMS, lanes=5, max_sessions=3, max_length=8)
    model = make("hiertcn").double()
    inputs = SessionInputs(model, lane_batch(sessions))
    steps, lanes, positions, dim = inputs.embedded.shape
    row_groups = [torch.tensor([3, 0, 7]), torch.tensor([1]), torch.tensor([steps * lanes - 1, 2])]
    widths = [positions - 1, 1, 2]
    gathered = inputs._gather_with_items(row_groups, widths)[0]
    flat = inputs.embedded.reshape(steps * lanes, positions, dim)
    expected = [torch.stack([flat[r, :w] for r in rows.tolist()]) for rows, w in zip(row_groups, widths)]
    for got, want in zip(gathered, expected):
        assert torch.equal(got, want)
    weights = [torch.randn_like(g) for g in gathered]
    got = torch.autograd.grad(sum((g * w).sum() for g, w in zip(gathered, weights)), inputs.embedded,
                              retain_graph=True)[0]
    want = torch.autograd.grad(sum((e * w).sum() for e, w in zip(expected, weights)), inputs.embedded)[0]
    assert torch.equal(got, want)


@pytest.mark.parametrize("read", ["both", "items", "some steps' items", "rows"])
def test_the_embeddings_two_reads_and_their_one_gradient(read):
    """The low level's gathered inputs and the high level's session items come from one autograd node: values
    equal to slicing the embeddings, and the embeddings' gradient equal to autograd's own through slices,
    whichever of the reads get gradients."""
    from hiertcn_fast.models.base import SessionInputs
    generator = torch.Generator().manual_seed(6)
    sessions = random_sessions(generator, NUM_ITEMS, lanes=4, max_sessions=3, max_length=7)
    model = make("hiertcn").double()
    inputs = SessionInputs(model, lane_batch(sessions))
    steps, lanes, positions, dim = inputs.embedded.shape
    row_groups, widths = [torch.tensor([5, 1]), torch.tensor([0, steps * lanes - 1])], [positions - 1, 2]
    groups, items = inputs._gather_with_items(row_groups, widths)
    flat = inputs.embedded.reshape(steps * lanes, positions, dim)
    expected_groups = [torch.stack([flat[r, :w] for r in rows.tolist()]) for rows, w in zip(row_groups, widths)]
    expected_items = [inputs.embedded[step, :, 1:] for step in range(steps)]
    assert len(groups) == len(expected_groups) and len(items) == len(expected_items) == steps
    assert all(torch.equal(a, b) for a, b in zip(groups, expected_groups, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(items, expected_items, strict=True))
    used_steps = {"both": range(steps), "items": range(steps), "some steps' items": [steps - 1], "rows": []}[read]

    def loss(group_values, item_values):
        total = sum((v * torch.linspace(-1, 1, v.numel(), dtype=v.dtype).view_as(v)).sum()
                    for v in [item_values[s] for s in used_steps])
        if read in ("both", "rows"):
            total = total + sum((v * 0.5 + v.square()).sum() for v in group_values)
        return total

    got = torch.autograd.grad(loss(groups, items), inputs.embedded, retain_graph=True)[0]
    want = torch.autograd.grad(loss(expected_groups, expected_items), inputs.embedded)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_reads_made_without_gradients_are_made_again_with_them():
    """SessionInputs reads the embeddings once per grad mode: items read under no_grad, then the low level run
    with gradients, still give the embeddings their gradient."""
    from hiertcn_fast.models.base import SessionInputs
    generator = torch.Generator().manual_seed(7)
    sessions = random_sessions(generator, NUM_ITEMS, lanes=4, max_sessions=2, max_length=5)
    inputs = SessionInputs(make("hiertcn").double(), lane_batch(sessions))
    with torch.no_grad():
        inputs.session_items()  # reads the embeddings, the low level's rows included, without gradients
    features = inputs.low_level(lambda x: x * 2.0)
    assert features.requires_grad
    (grad,) = torch.autograd.grad(features.sum(), inputs.embedded)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("name", MODELS)
def test_sessions_run_in_length_groups_give_the_features_of_one_padded_run(name, monkeypatch):
    """Running the sessions in groups of similar length (each trimmed to its longest), and padding the batch
    wider, change neither the features (in batch_targets' order) nor any gradient."""
    from hiertcn_fast.models import base
    generator = torch.Generator().manual_seed(3)
    sessions = random_sessions(generator, NUM_ITEMS, lanes=7, max_sessions=3, max_length=9)

    def run(groups, width=None):
        monkeypatch.setattr(base, "GROUP_OVERHEAD_POSITIONS", 0 if groups else 10 ** 9)
        model = make(name).double()
        batch = lane_batch(sessions, width=width)
        features, _ = model(batch, None)
        loss = torch.nn.functional.cross_entropy(model.scores(features), batch_targets(batch)["targets"])
        loss.backward()
        return features.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    lengths = [len(s) for lane in sessions for s in lane]
    monkeypatch.setattr(base, "GROUP_OVERHEAD_POSITIONS", 0)
    assert len(base.length_groups(lengths)) > 1  # the grouped path is taken
    grouped, grouped_grads = run(True)
    single, single_grads = run(False)
    wide, wide_grads = run(True, width=13)
    for features, grads in ((single, single_grads), (wide, wide_grads)):
        torch.testing.assert_close(grouped, features)
        assert grads.keys() == grouped_grads.keys()
        for key in grads:
            torch.testing.assert_close(grouped_grads[key], grads[key])


@pytest.mark.parametrize("grouped", [True, False])
def test_low_level_events_equal_a_boolean_mask_over_one_padded_run(grouped, monkeypatch):
    """SessionInputs.low_level's features (grouped by length, or one padded run) against an independent
    composition: the network over every session padded to the batch's width, then the events picked by a
    boolean mask in steps * lanes order; values, and the gradient the embeddings get back."""
    from hiertcn_fast.models import base
    generator = torch.Generator().manual_seed(8)
    sessions = random_sessions(generator, NUM_ITEMS, lanes=6, max_sessions=3, max_length=9)
    monkeypatch.setattr(base, "GROUP_OVERHEAD_POSITIONS", 0 if grouped else 10 ** 9)
    inputs = base.SessionInputs(make("hiertcn").double(), lane_batch(sessions))
    lengths = inputs.lengths.reshape(-1)
    assert (len(base.length_groups(lengths[lengths > 0].tolist())) > 1) == grouped

    def network(x):  # causal: position t reads position t only; distinct per position, so a misplaced row shows
        return x * torch.arange(1, x.shape[1] + 1, dtype=x.dtype)[:, None] + x.square()

    features = inputs.low_level(network)
    steps, lanes, positions, dim = inputs.embedded.shape
    padded = network(inputs.embedded.reshape(steps * lanes, positions, dim)[:, :inputs.width])
    expected = padded[inputs.mask.reshape(steps * lanes, inputs.width)]
    assert features.shape == expected.shape and torch.equal(features, expected)
    weights = torch.randn(features.shape, generator=generator, dtype=features.dtype)
    got = torch.autograd.grad((features * weights).sum(), inputs.embedded, retain_graph=True)[0]
    want = torch.autograd.grad((expected * weights).sum(), inputs.embedded)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_gather_events_gradcheck():
    """_GatherEvents (the low level's groups' events into the batch's order) passes gradcheck in float64, with
    several groups and with one group in its own order."""
    from hiertcn_fast.models.base import _GatherEvents
    generator = torch.Generator().manual_seed(9)
    a = torch.randn(3, 4, 2, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(2, 2, 2, dtype=torch.float64, generator=generator, requires_grad=True)
    sources = [torch.tensor([0, 1, 4, 9, 10]), torch.tensor([0, 2, 3])]
    destinations = [torch.tensor([6, 0, 2, 7, 3]), torch.tensor([5, 1, 4])]
    out = _GatherEvents.apply(8, sources, destinations, a, b)
    assert torch.equal(out[6], a.reshape(-1, 2)[0]) and torch.equal(out[4], b.reshape(-1, 2)[3])
    assert torch.autograd.gradcheck(lambda x, y: _GatherEvents.apply(8, sources, destinations, x, y), (a, b))
    assert torch.autograd.gradcheck(lambda x: _GatherEvents.apply(5, sources[:1], [None], x), (a,))


@pytest.mark.parametrize("name", MODELS)
def test_lengths_and_item_ids_that_do_not_fit_the_batch_are_clear_errors(name):
    """A negative length was taken as an empty session by HRNN and SessionGRU (HierTCN refused it only inside
    its GRU op); a length past the items' width and an id past the catalogue were the embedding's 'index out of
    range in self', naming neither."""
    model = make(name).eval()
    for change, message in ((lambda b: b.lengths.__setitem__((0, 1), -2), r"lengths must lie in \[0, 3\].*\[-2, 3\]"),
                            (lambda b: b.lengths.__setitem__((0, 0), 6), r"lengths must lie in \[0, 3\].*\[2, 6\]"),
                            (lambda b: b.items.__setitem__((0, 0, 3), NUM_ITEMS + 9),
                             rf"item ids in 1..{NUM_ITEMS} .*got ids in \[0, {NUM_ITEMS + 9}\]"),
                            (lambda b: b.items.__setitem__((0, 1, 1), -1), r"got ids in \[-1, ")):
        batch = lane_batch([[[1, 2, 3]], [[4, 5]]])
        change(batch)
        with pytest.raises(ValueError, match=message):
            model(batch)
    features, _ = model(lane_batch([[[1, 2, 3]], [[4, 5]]]))
    assert features.shape[0] == 5
