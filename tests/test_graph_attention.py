"""graph_attention.py: GraphAttention computes exactly the masked, biased, gated attention its
edges describe, on the dense and flex backends, inside GPT blocks; bad edges are refused by
name; its parameters are classified by shape, get correct gradients, and a GraphAttention GPT
passes the muP coord check (docs/mup.md invariant 3) where SP fails it."""
import functools

import pytest
import torch

import model as model_module
from coord_check import measure, slopes
from graph_attention import GraphAttention, graph_tensors, nearest_friend_batch, set_graph
from model import GPT, GPTConfig

N_TYPES, MAX_DIST, N_HEAD = 3, 4, 2
# two small directed graphs on 5 nodes: (source, target, type, distance)
EDGES = [
    [(0, 1, 0, 1), (1, 0, 0, 1), (2, 1, 1, 3), (4, 3, 2, 2), (3, 3, 2, 4), (0, 4, 1, 0), (2, 1, 1, 3)],
    [(1, 2, 2, 4), (3, 2, 0, 1), (4, 0, 1, 2)],
]
NODES = 5
graph_attention_cls = functools.partial(GraphAttention, num_edge_types=N_TYPES, max_distance=MAX_DIST)


def config(n_embd=16, **kw):
    return GPTConfig(**{**dict(block_size=16, vocab_size=8, n_layer=2, n_head=N_HEAD, n_embd=n_embd, bias=False), **kw})


def graph_layer(backend='dense', dtype=torch.float32, seed=0):
    """A GraphAttention layer with random (non-zero) tables and gate, so that each one matters."""
    torch.manual_seed(seed)
    attn = graph_attention_cls(config(attn_backend=backend)).to(dtype)
    with torch.no_grad():
        for p in (attn.edge_type_bias, attn.distance_bias, attn.edge_gate):
            p.normal_()
    attn.set_graph(graph_tensors(EDGES, NODES, N_TYPES, MAX_DIST))
    return attn


def hand_written(attn, q, k, v):
    """The attention the edge lists describe, written out edge by edge: node i attends to itself
    (type row 0, distance 0) and to the source of every edge into i (a self-loop edge replaces
    the node's own entry)."""
    out = torch.zeros_like(q)
    for b, edges in enumerate(EDGES):
        for h in range(N_HEAD):
            for i in range(NODES):
                keys = {i: (0, 0)}
                keys.update({s: (1 + t, d) for s, tgt, t, d in edges if tgt == i})
                js = list(keys)
                scores = torch.stack([
                    2 * torch.sigmoid(attn.edge_gate[keys[j][0], h]) * (q[b, h, i] @ k[b, h, j]) * attn.scale
                    + attn.edge_type_bias[keys[j][0], h] + attn.distance_bias[keys[j][1], h] for j in js])
                out[b, h, i] = torch.softmax(scores, 0) @ v[b, h, js]
    return out


def seeded_gpt(cfg, seed=0):
    torch.manual_seed(seed)
    return GPT(cfg, graph_attention_cls)


@pytest.mark.parametrize('backend', ['dense', 'flex'])
def test_graph_attention_equals_hand_written_masked_attention(backend):
    attn = graph_layer(backend)
    q, k, v = torch.randn(3, 2, N_HEAD, NODES, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = attn.attend(q, k, v, attn.make_mask(2, NODES, q.device))
        torch.testing.assert_close(out, hand_written(attn, q, k, v), rtol=0, atol=1e-5)


def test_graph_tables_and_gate_pass_float64_gradcheck():
    attn = graph_layer('dense', torch.float64)
    names = ['edge_type_bias', 'distance_bias', 'edge_gate']
    x = torch.randn(2, NODES, 16, dtype=torch.float64, requires_grad=True)
    params = [getattr(attn, n).detach().clone().requires_grad_() for n in names]
    mask = attn.make_mask(2, NODES, x.device)
    f = lambda x, *params: torch.func.functional_call(attn, dict(zip(names, params)), (x, mask))
    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


@pytest.mark.parametrize('edges, problem', [
    ([(0, 5, 0, 1)], 'node 5 is out of range'),
    ([(-1, 2, 0, 1)], 'node -1 is out of range'),
    ([(0, 1, 0, -2)], 'negative distance -2'),
    ([(0, 1, 0, MAX_DIST + 1)], f'exceeds max_distance={MAX_DIST}'),
    ([(0, 1, N_TYPES, 1)], f'unknown edge type {N_TYPES}'),
    ([(0, 1, 0, 1), (2, 3, 1, 1), (0, 1, 1, 1)], r'conflicts with \(0, 1, 0, 1\)'),
    ([(0, 1.0, 0, 1)], 'a tuple of 4 ints'),
])
def test_bad_edges_raise_value_error_naming_the_edge(edges, problem):
    with pytest.raises(ValueError, match=problem) as error:
        graph_tensors([[(1, 2, 0, 1)], edges], NODES, N_TYPES, MAX_DIST)
    assert f"edge {edges[-1]!r} of graph 1" in str(error.value)


def test_graph_must_be_set_and_fit_the_batch():
    gpt = seeded_gpt(config())
    idx = torch.zeros(2, NODES, dtype=torch.long)
    with pytest.raises(RuntimeError, match='call set_graph'):
        gpt(idx)
    set_graph(gpt, graph_tensors(EDGES, NODES, N_TYPES, MAX_DIST))
    with pytest.raises(ValueError, match='one graph per sequence'):
        gpt(idx[:1])
    with pytest.raises(ValueError, match=f'edge type {N_TYPES} and distance 1, but this layer was built'):
        set_graph(gpt, graph_tensors([[(0, 1, N_TYPES, 1)], []], NODES, N_TYPES + 1, MAX_DIST))
    with pytest.raises(ValueError, match="leave attn_mod='causal'"):
        seeded_gpt(config(attn_mod='alibi'))


def test_graph_gpt_flex_matches_dense_with_one_block_mask_per_forward(monkeypatch):
    """Inside GPT blocks on the flex backend the block mask comes from the graph: built once per
    forward for all layers, from whatever graph set_graph gave last."""
    calls = []
    real = model_module.create_block_mask
    monkeypatch.setattr(model_module, 'create_block_mask', lambda *a, **kw: calls.append(a[1:4]) or real(*a, **kw))
    dense = seeded_gpt(config(attn_backend='dense', n_layer=3))
    flex = seeded_gpt(config(attn_backend='flex', n_layer=3))
    flex.load_state_dict(dense.state_dict())
    idx = torch.randint(8, (2, NODES), generator=torch.Generator().manual_seed(0))
    other = graph_tensors([[(1, 2, 0, 1)], [(3, 4, 2, 2)]], NODES, N_TYPES, MAX_DIST)
    with torch.no_grad():
        outputs = []
        for graph in (graph_tensors(EDGES, NODES, N_TYPES, MAX_DIST), other):
            set_graph(dense, graph)
            set_graph(flex, graph)
            torch.testing.assert_close(flex(idx, idx)[0], dense(idx, idx)[0], rtol=0, atol=1e-5)
            outputs.append(dense(idx, idx)[0])
    assert calls == [(2, N_HEAD, NODES)] * 2 # one per forward of the 3-layer flex model
    assert (outputs[0] - outputs[1]).abs().max() > 1e-4 # the new graph was used


@pytest.mark.parametrize('width', [16, 64])
def test_graph_parameters_are_not_hidden_and_get_gradients(width):
    """[num_edge_types + 1, n_head] and [max_distance + 1, n_head] tables have no growing dim:
    docs/mup.md's finite tables, lr as is (lr_scale 1), never 'hidden'."""
    gpt = seeded_gpt(config(n_embd=width, mup_base_width=16, attn_backend='dense'))
    for name in ('edge_type_bias', 'distance_bias', 'edge_gate'):
        assert gpt.mup_param_info[f'transformer.h.1.attn.{name}'] == ('embedding', 1.0, True)
    assert gpt.mup_param_info['transformer.h.1.attn.c_attn.q.weight'] == ('hidden', width / 16, True)
    colours, labels, edges = nearest_friend_batch(4, NODES, 8, 3, 1, MAX_DIST, torch.Generator().manual_seed(0))
    set_graph(gpt, graph_tensors(edges, NODES, N_TYPES, MAX_DIST))
    gpt(colours, labels)[1].backward()
    for block in gpt.transformer.h:
        for p in (block.attn.edge_type_bias, block.attn.distance_bias, block.attn.edge_gate):
            assert p.grad.abs().sum() > 0


def test_nearest_friend_labels_follow_the_edges():
    colours, labels, edges = nearest_friend_batch(3, 6, 5, 3, 2, 4, torch.Generator().manual_seed(0))
    for b, graph in enumerate(edges):
        for node in range(6):
            incoming = [e for e in graph if e[1] == node]
            assert len(incoming) == 3 and len({e[0] for e in incoming}) == 3 and node not in {e[0] for e in incoming}
            assert len({e[3] for e in incoming}) == 3 and all(1 <= e[3] <= 4 for e in incoming)
            nearest = min((e for e in incoming if e[2] == 1), key=lambda e: e[3])
            assert labels[b, node] == colours[b, nearest[0]]


# ---- coord check (docs/mup.md invariant 3) for a GPT built from GraphAttention

WIDTHS = [64, 128, 256, 512]

def graph_coord_slopes(param):
    """mean|h| slopes vs width after 4 Adam steps (coord_check.measure) on the same graphs. lr 5e-3:
    at 1e-2 this 128-token batch makes the muP slopes seed noise of up to 0.34 (seeds 0-3; 0.17 at
    5e-3), while SP's worst slope is 2.3-2.5 at either lr."""
    colours, labels, edges = nearest_friend_batch(8, 16, 8, 4, 2, MAX_DIST, torch.Generator().manual_seed(0))
    graph = graph_tensors(edges, 16, N_TYPES, MAX_DIST)
    results = []
    for width in WIDTHS:
        gpt = seeded_gpt(config(n_embd=width, n_head=4, mup_base_width=64 if param == 'mup' else 0,
                               attn_backend='dense'))
        set_graph(gpt, graph)
        h, dh, losses = measure(gpt, colours, labels, lr=5e-3, steps=4)
        results.append(dict(size=width, h=h, dh=dh, losses=losses))
    return slopes(results)


def test_graph_attention_mup_coord_check_is_flat():
    worst = max(graph_coord_slopes('mup').items(), key=lambda kv: abs(kv[1]))
    assert abs(worst[1]) <= 0.25, f"muP coordinate {worst[0]} grows with width: slope {worst[1]:.2f}"


def test_graph_attention_sp_coord_check_blows_up():
    worst = max(abs(s) for s in graph_coord_slopes('sp').values())
    assert worst >= 1.0, f"SP's worst slope is only {worst:.2f}: this check could not tell SP from muP"
