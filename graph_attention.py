"""
Graph attention as a MuPFlexAttention subclass: a GPT whose tokens are the nodes of a graph,
where node i attends to itself and to the sources of its incoming edges, with a learned per-head
bias for the edge type and the edge distance and a learned per-head gate on the content score.

Edges are (source, target, type, distance): information flows from source to target, so the
target (the query) attends to the source (the key). `graph_tensors` turns edge lists into
tensors once per graph batch; `set_graph(model, graph)` hands them to every GraphAttention
layer. The mods only index those tensors and the parameters with b, h, q_idx, kv_idx, so they
run on the dense and flex backends alike, and muP classifies the new parameters by shape.

The toy task: random graphs whose nodes carry a colour; a node's label is the colour of its
nearest (smallest distance) neighbour among its 'friend' (type 1) edges. The same GPT with plain
causal attention, which cannot see the edges, is the baseline.

$ python graph_attention.py                       # CPU: graph model, then the baseline, < 1 min
$ python graph_attention.py --max_iters=600 --n_embd=128 --mup_base_width=64
"""

import functools
import sys
import time
from typing import NamedTuple

import torch
import torch.nn as nn

from model import GPT, GPTConfig, MuPFlexAttention, set_lr


class Graph(NamedTuple):
    """A batch of graphs as (B, N, N) tensors, indexed [b, target, source] = [b, q_idx, kv_idx]."""
    adjacency: torch.Tensor # bool: target attends to source; the diagonal is set (a node sees itself)
    edge_type: torch.Tensor # long: 1 + the edge's type; 0 on the diagonal and where there is no edge
    distance: torch.Tensor  # long: the edge's distance; 0 on the diagonal and where there is no edge


def graph_tensors(graphs, num_nodes, num_edge_types, max_distance, device='cpu'):
    """graphs: a list of B edge lists, one per sequence of the batch; each edge is a tuple of
    ints (source, target, type, distance) with nodes in [0, num_nodes), type in
    [0, num_edge_types) and distance in [0, max_distance]. A repeated edge is fine, one that
    contradicts an earlier one between the same nodes is not. An edge source -> source (a
    self-loop) replaces the node's own type-0 entry. Returns a Graph; raises ValueError naming
    the first bad edge."""
    index, types, distances = [], [], []
    for b, edges in enumerate(graphs):
        seen = {}
        for edge in edges:
            where = f"edge {edge!r} of graph {b}"
            if not (isinstance(edge, tuple) and len(edge) == 4 and all(type(v) is int for v in edge)):
                raise ValueError(f"{where}: an edge is a tuple of 4 ints (source, target, type, distance)")
            source, target, edge_type, distance = edge
            for node in (source, target):
                if not 0 <= node < num_nodes:
                    raise ValueError(f"{where}: node {node} is out of range; nodes are 0..{num_nodes - 1}")
            if not 0 <= edge_type < num_edge_types:
                raise ValueError(f"{where}: unknown edge type {edge_type}; types are 0..{num_edge_types - 1} "
                                 f"(num_edge_types={num_edge_types})")
            if distance < 0:
                raise ValueError(f"{where}: negative distance {distance}; distances are 0..{max_distance}")
            if distance > max_distance:
                raise ValueError(f"{where}: distance {distance} exceeds max_distance={max_distance}; "
                                 f"raise max_distance or bucket the distances")
            if (source, target) in seen:
                if seen[source, target] != edge:
                    raise ValueError(f"{where} conflicts with {seen[source, target]!r}: two edges {source} -> "
                                     f"{target} with a different type or distance; keep one of them")
                continue
            seen[source, target] = edge
            index.append((b, target, source))
            types.append(1 + edge_type)
            distances.append(distance)
    B, N = len(graphs), num_nodes
    adjacency = torch.eye(N, dtype=torch.bool).repeat(B, 1, 1)
    edge_type = torch.zeros(B, N, N, dtype=torch.long)
    distance = torch.zeros(B, N, N, dtype=torch.long)
    if index:
        b, target, source = torch.tensor(index).unbind(1)
        adjacency[b, target, source] = True
        edge_type[b, target, source] = torch.tensor(types)
        distance[b, target, source] = torch.tensor(distances)
    return Graph(adjacency.to(device), edge_type.to(device), distance.to(device))


class GraphAttention(MuPFlexAttention):
    """Attention over a graph (Graphormer-style edge encodings as per-head score biases).
    GPT builds attention as attn_cls(config): the setting attn_cls='graph_attention:GraphAttention'
    builds it with the default edge types and distances, and functools.partial(GraphAttention,
    num_edge_types=..., max_distance=...) with others. Parameter shapes then follow from the
    config and those arguments alone, as muP's shape comparison needs. It needs a graph at every
    forward (set_graph), which train.py's text batches do not have: train it as this script does."""

    def __init__(self, config, num_edge_types=2, max_distance=8):
        super().__init__(config)
        if config.attn_mod != 'causal':
            raise ValueError(f"attn_mod={config.attn_mod!r}: GraphAttention's mask and score come from the "
                             f"graph; leave attn_mod='causal' (the default)")
        self.num_edge_types, self.max_distance = num_edge_types, max_distance
        # Finite shapes (n_head, not n_embd): muP classes them as non-hidden tables, lr as is.
        # Row 0 of the type tables is the node itself, rows 1.. are the edge types.
        # Zero init: the model starts as plain attention restricted to the graph.
        self.edge_type_bias = nn.Parameter(torch.zeros(num_edge_types + 1, config.n_head))
        self.distance_bias = nn.Parameter(torch.zeros(max_distance + 1, config.n_head))
        self.edge_gate = nn.Parameter(torch.zeros(num_edge_types + 1, config.n_head)) # 2*sigmoid(0) = 1
        self.graph = None

    def set_graph(self, graph):
        """Use `graph` (from graph_tensors) until the next call; the next forward builds its mask."""
        max_type, max_distance = graph.edge_type.max().item() - 1, graph.distance.max().item()
        if max_type >= self.num_edge_types or max_distance > self.max_distance:
            raise ValueError(f"graph has edge type {max_type} and distance {max_distance}, but this layer was built "
                             f"with num_edge_types={self.num_edge_types}, max_distance={self.max_distance}: "
                             f"build the graph with the layer's values")
        self.graph = graph

    def make_mask(self, B, T, device, q_offset=0):
        if self.graph is None:
            raise RuntimeError("GraphAttention has no graph: call set_graph(graph_tensors(...)) on every layer first")
        if self.graph.adjacency.shape != (B, T, T):
            raise ValueError(f"graph tensors have shape {tuple(self.graph.adjacency.shape)} but the batch is "
                             f"{B} sequences of {T} nodes: build one graph per sequence, "
                             f"with num_nodes = sequence length")
        return super().make_mask(B, T, device, q_offset)

    def mask_mod(self, b, h, q_idx, kv_idx):
        return self.graph.adjacency[b, q_idx, kv_idx]

    def score_mod(self, score, b, h, q_idx, kv_idx):
        # `score` already carries the muP logit scale; the biases are added unscaled (docs/mup.md)
        edge_type = self.graph.edge_type[b, q_idx, kv_idx]
        gate = 2 * torch.sigmoid(self.edge_gate[edge_type, h])
        return (gate * score + self.edge_type_bias[edge_type, h]
                + self.distance_bias[self.graph.distance[b, q_idx, kv_idx], h])


def set_graph(model, graph):
    """Give every GraphAttention layer of `model` the same graph (tensors built once)."""
    for module in model.modules():
        if isinstance(module, GraphAttention):
            module.set_graph(graph)

# -----------------------------------------------------------------------------
# the toy task: colour of the nearest friend

def nearest_friend_batch(batch_size, num_nodes, num_colours, in_degree, friends, max_distance, generator):
    """Random graphs: every node gets `in_degree` incoming edges from distinct other nodes, at
    distinct distances in 1..max_distance; `friends` of them have type 1, the rest type 0.
    Returns (colours (B, N), labels (B, N), edge lists): a node's label is the colour of its
    nearest friend."""
    B, N, K = batch_size, num_nodes, in_degree
    colours = torch.randint(num_colours, (B, N), generator=generator)
    # sources: the K smallest of N random keys, with the node itself pushed last
    keys = torch.rand(B, N, N, generator=generator) + 2 * torch.eye(N)
    sources = keys.argsort(-1)[..., :K]                                                  # (B, N, K)
    distances = 1 + torch.rand(B, N, max_distance, generator=generator).argsort(-1)[..., :K]
    types = (torch.arange(K) < friends).long().expand(B, N, K)                          # first `friends` are friends
    nearest = distances[..., :friends].argmin(-1, keepdim=True)
    labels = colours.gather(1, sources[..., :friends].gather(-1, nearest).squeeze(-1))
    targets = torch.arange(N).view(1, N, 1).expand(B, N, K)
    edges = torch.stack((sources, targets, types, distances), -1).view(B, N * K, 4).tolist()
    return colours, labels, [[tuple(e) for e in graph] for graph in edges]


if __name__ == '__main__':
    from configurator import configure

    # -------------------------------------------------------------------------
    # default config values, every one overridable with --key=value
    num_nodes = 16
    num_colours = 8
    in_degree = 4
    friends = 2
    max_distance = 8
    n_layer = 2
    n_head = 4
    n_embd = 64
    mup_base_width = 0 # 0 = SP; e.g. --n_embd=128 --mup_base_width=64 for muP
    attn_backend = 'auto' # dense on CPU, flex on CUDA
    batch_size = 64
    max_iters = 400
    learning_rate = 3e-3
    eval_batches = 8
    device = 'cpu'
    threads = 1 # CPU intra-op threads: this model's matmuls are tiny, and on a busy 2-core machine
                # 2 threads made 100 steps take 129 s instead of 6 s (OpenMP threads waiting on each other)
    seed = 1337
    # -------------------------------------------------------------------------
    configure(globals(), sys.argv[1:])
    torch.set_num_threads(threads)
    if not 1 <= friends <= in_degree <= min(num_nodes - 1, max_distance):
        raise ValueError(f"need 1 <= friends ({friends}) <= in_degree ({in_degree}) <= "
                         f"min(num_nodes - 1, max_distance) ({min(num_nodes - 1, max_distance)})")
    task = dict(num_nodes=num_nodes, num_colours=num_colours, in_degree=in_degree, friends=friends,
                max_distance=max_distance)

    def batch(generator, size=batch_size):
        colours, labels, edges = nearest_friend_batch(size, generator=generator, **task)
        graph = graph_tensors(edges, num_nodes, num_edge_types=2, max_distance=max_distance, device=device)
        return colours.to(device), labels.to(device), graph

    def train_and_evaluate(attn_cls):
        """Train from seed on the same stream of graphs; return (accuracy on held-out graphs, seconds)."""
        torch.manual_seed(seed)
        config = GPTConfig(block_size=num_nodes, vocab_size=num_colours, n_layer=n_layer, n_head=n_head,
                           n_embd=n_embd, bias=False, mup_base_width=mup_base_width, attn_backend=attn_backend)
        model = GPT(config, attn_cls).to(device)
        optimizer = model.configure_optimizers(0.0, learning_rate, (0.9, 0.99), device.split(':')[0])
        data = torch.Generator().manual_seed(seed)
        t0 = time.time()
        for it in range(max_iters):
            lr = learning_rate * min(1.0, (it + 1) / 20) # short warmup
            set_lr(optimizer, lr) # each muP group at lr * its lr_scale, as train.py
            colours, labels, graph = batch(data)
            set_graph(model, graph)
            _, loss = model(colours, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        held_out = torch.Generator().manual_seed(seed + 1)
        correct = total = 0
        model.eval()
        with torch.no_grad():
            for _ in range(eval_batches):
                colours, labels, graph = batch(held_out)
                set_graph(model, graph)
                logits, _ = model(colours, labels) # with targets: logits at every node
                correct += (logits.argmax(-1) == labels).sum().item()
                total += labels.numel()
        print(f"  final train loss {loss.item():.3f}")
        return correct / total, time.time() - t0

    print(f"nearest-friend colour: {num_nodes} nodes, {num_colours} colours, {in_degree} in-edges per node "
          f"({friends} friends), distances 1..{max_distance}; GPT {n_layer}x{n_embd}, {n_head} heads, "
          f"{'SP' if not mup_base_width else f'muP base width {mup_base_width}'}; "
          f"{max_iters} steps of {batch_size} graphs, Adam lr {learning_rate:g}")
    graph_cls = functools.partial(GraphAttention, num_edge_types=2, max_distance=max_distance)
    print("graph attention:")
    graph_acc, graph_s = train_and_evaluate(graph_cls)
    print("edge-blind baseline (plain causal attention):")
    base_acc, base_s = train_and_evaluate(MuPFlexAttention)
    print(f"held-out node accuracy ({eval_batches * batch_size} graphs): graph attention {graph_acc:.3f} "
          f"({graph_s:.0f}s), edge-blind baseline {base_acc:.3f} ({base_s:.0f}s), chance {1 / num_colours:.3f}")
