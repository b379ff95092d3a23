"""The item trie as flat tensors (SPEC §3–§4).

Every catalogue item is a token sequence followed by an explicit EOS edge, so an item that is a
prefix of another stays reachable: its inner node has an EOS child, and the node reached through
that edge is the item's leaf. Identical sequences share one leaf whose canonical id is the smallest
item id among them.

Layout (all tensors on one device; nodes numbered breadth-first, so the children of a node are
contiguous and sorted by token, and edge e leads to node e + 1):

    node_parent (N,)    parent node id, -1 for the root (node 0)
    node_token  (N,)    token on the edge into the node, -1 for the root
    node_depth  (N,)    number of tokens from the root (EOS included)
    leaf_item   (N,)    canonical item id of a leaf, -1 for inner nodes
    child_ptr   (N+1,)  CSR row pointer: node n has the edges child_ptr[n] : child_ptr[n+1]
    child_token (E,)    token of each edge, sorted within a node (a view of node_token[1:])
    depth_fanout (L+2,) largest number of children of a node at each depth (decoding width per step)

Node and edge ids, tokens and depths are int32 (int64 only where a value would not fit: more than
2**31 - 1 nodes, a vocabulary or an item id past int32), so a node costs about 30 bytes (ten
million random titles: 74 M nodes, 2.1 GB); index with them as with int64 (arithmetic with int64
promotes).

Building is vectorised (one lexicographic sort of the padded sequences, one pass per depth), so a
catalogue of a million items takes seconds.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from bear.items import title_sequences
from bear.prompts import GENERIC_DOMAIN, format_prompt

__all__ = ["ItemTrie"]

_PAD = -1  # pad value after a sequence's EOS while building; sorts before every real token


class ItemTrie:
    """A prefix tree over item token sequences, stored as CSR tensors.

    Args:
        sequences: one list of token ids per item, without EOS.
        item_ids: the item id of each sequence (distinct, non-negative integers).
        eos_token_id: the token that ends an item; the trie adds the EOS edges itself.
        vocab_size: width of the allowed-token bitmask; default max token id + 1 (EOS included).

    Raises:
        ValueError: on an empty catalogue, mismatched lengths, duplicate or negative ids, negative
            token ids, EOS inside a sequence, or a token id >= vocab_size.
    """

    def __init__(self, sequences, item_ids, eos_token_id: int, vocab_size: int | None = None):
        seqs = sequences if isinstance(sequences, (list, tuple)) else list(sequences)
        ids = np.asarray(list(item_ids), dtype=np.int64).reshape(-1)
        if len(seqs) == 0:
            raise ValueError("ItemTrie: `sequences` is empty; a trie needs at least one item")
        if len(seqs) != ids.shape[0]:
            raise ValueError(
                f"ItemTrie: got {len(seqs)} sequences but {ids.shape[0]} item ids; "
                "pass one item id per sequence"
            )
        if (ids < 0).any():
            raise ValueError("ItemTrie: item ids must be non-negative integers")
        if np.unique(ids).shape[0] != ids.shape[0]:
            raise ValueError("ItemTrie: item ids must be distinct (one id per sequence)")
        eos = int(eos_token_id)
        if eos < 0:
            raise ValueError(f"ItemTrie: eos_token_id must be >= 0, got {eos}")

        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))  # (M,)
        max_len = int(lengths.max())
        width = max_len + 1  # room for the EOS edge
        flat = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=int(lengths.sum()))
        if flat.size and flat.min() < 0:
            raise ValueError("ItemTrie: token ids must be non-negative")
        if flat.size and (flat == eos).any():
            raise ValueError(
                f"ItemTrie: a sequence contains eos_token_id={eos}; pass sequences without EOS"
            )
        max_token = max(int(flat.max()) if flat.size else 0, eos)
        if vocab_size is None:
            vocab_size = max_token + 1
        vocab_size = int(vocab_size)
        if max_token >= vocab_size:
            raise ValueError(
                f"ItemTrie: token id {max_token} is >= vocab_size={vocab_size}; every token "
                "(EOS included) must be < vocab_size (pass the model's vocabulary size)"
            )

        # Padded sequences with the EOS edge: row m = seq_m, EOS, PAD, ...
        dtype = np.int32 if vocab_size < 2**31 - 1 else np.int64
        padded = np.full((len(seqs), width), _PAD, dtype=dtype)  # (M, L+1)
        row = np.repeat(np.arange(len(seqs)), lengths)
        col = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        padded[row, col] = flat
        padded[np.arange(len(seqs)), lengths] = eos

        # Lexicographic order; among identical sequences the smallest item id comes first. Columns
        # are packed into int64 sort keys (tokens + 1, so PAD = 0 sorts first) to cut the passes.
        bits = int(vocab_size).bit_length()  # token + 1 <= vocab_size fits in `bits` bits
        per_key = max(1, 62 // bits)
        keys = []
        for c0 in range(0, width, per_key):
            key = np.zeros(len(seqs), dtype=np.int64)
            for c in range(c0, min(c0 + per_key, width)):
                key = (key << bits) | (padded[:, c].astype(np.int64) + 1)
            key <<= bits * (c0 + per_key - min(c0 + per_key, width))  # left-align a short key
            keys.append(key)
        order = np.lexsort((ids,) + tuple(keys[::-1]))
        padded, ids_sorted, lengths_sorted = padded[order], ids[order], lengths[order]

        # lcp[r] = first column where row r differs from row r-1 (width when identical).
        diff = padded[1:] != padded[:-1]  # (M-1, L+1)
        lcp = np.where(diff.any(1), diff.argmax(1), width)
        lcp = np.concatenate([[-1], lcp])  # row 0 starts every prefix

        # A node of depth d (prefix of d tokens, 1 <= d <= len+1) starts at row r iff lcp[r] < d.
        depth = np.arange(1, width + 1)  # (L+1,)
        new = (lcp[:, None] < depth[None, :]) & (depth[None, :] <= lengths_sorted[:, None] + 1)
        # Breadth-first numbering: by depth, then by row (lexicographic within a depth).
        d_idx, r_idx = np.nonzero(new.T)  # both sorted by (depth, row)
        num_nodes = 1 + d_idx.shape[0]
        index = np.int32 if num_nodes < 2**31 - 1 else np.int64  # node and edge ids
        node_depth = np.concatenate([[0], d_idx + 1]).astype(np.int32)
        node_token = np.concatenate([[-1], padded[r_idx, d_idx]]).astype(dtype)

        # Node id of the depth-d prefix of every row: the last node started at a row <= r.
        node_at = np.zeros((len(seqs), width + 1), dtype=index)  # (M, L+2); column 0 = root
        bounds = np.searchsorted(d_idx, np.arange(width + 1))  # d_idx is sorted by depth
        for d in range(1, width + 1):
            lo, hi = bounds[d - 1], bounds[d]
            starts = np.zeros(len(seqs), dtype=index)
            starts[r_idx[lo:hi]] = np.arange(1 + lo, 1 + hi)
            np.maximum.accumulate(starts, out=starts)
            node_at[:, d] = starts
        node_parent = np.concatenate([[-1], node_at[r_idx, d_idx]]).astype(index)

        # Leaves: the node reached through the EOS edge; the first row of a group is canonical.
        rows = np.arange(len(seqs))
        leaf_of_row = node_at[rows, lengths_sorted + 1]  # (M,)
        leaf_item = np.full(num_nodes, -1, dtype=np.int32 if ids.max() < 2**31 else np.int64)
        first = np.concatenate([[True], leaf_of_row[1:] != leaf_of_row[:-1]])
        leaf_item[leaf_of_row[first]] = ids_sorted[first]

        # CSR children: edge e leads to node e + 1 (parents are non-decreasing in node order).
        counts = np.bincount(node_parent[1:], minlength=num_nodes)
        child_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(index)
        fanout = np.zeros(width + 2, dtype=np.int64)
        np.maximum.at(fanout, node_depth, counts)

        # Item id -> leaf, sorted by id for lookups.
        id_order = np.argsort(ids_sorted, kind="stable")
        self._item_sorted = torch.from_numpy(ids_sorted[id_order].copy())  # (M,)
        self._item_leaf = torch.from_numpy(leaf_of_row[id_order].copy())  # (M,)

        self.node_parent = torch.from_numpy(node_parent)
        self.node_token = torch.from_numpy(node_token)
        self.node_depth = torch.from_numpy(node_depth)
        self.leaf_item = torch.from_numpy(leaf_item)
        self.child_ptr = torch.from_numpy(child_ptr)
        self.child_token = self.node_token[1:]  # edge e leads to node e + 1
        self.depth_fanout = torch.from_numpy(fanout)
        # Sorted (parent, token) keys for child lookups by searchsorted.
        self._edge_key = self.node_parent[1:].long() * vocab_size + self.child_token

        self.eos_token_id = eos
        self.vocab_size = vocab_size
        self.num_items = int(ids.shape[0])
        self.num_leaves = int(first.sum())
        self.max_len = max_len  # longest sequence, EOS excluded
        self.max_fanout = int(counts.max())
        self.depth_fanout_list = fanout.tolist()  # host copy: decoding width per step, no sync
        # every label row starts at the root, whose fan-out grows with the catalogue: its packed
        # row is built once (ceil(V / 32) int32)
        self._root_mask = self._packed(torch.zeros(1, dtype=torch.int64))[0]
        # the root's children (edges 0 .. F-1, in token order) as int64 indices into a logits
        # row: a search's first step gathers their log p (``root_children``)
        self.root_tokens = self.child_token[: int(fanout[0])].long()

    @classmethod
    def from_titles(
        cls, tokenizer, titles, context: str | None = None, vocab_size: int | None = None
    ) -> ItemTrie:
        """The trie of a catalogue of titles, each tokenised as it follows the prompt in use.

        A response is ``format_response(title)`` (the title in double quotes) then EOS; its
        tokens are those of ``tokenizer(context + response)`` after the context's own tokens
        (``bear.items.title_sequences``), which is how labels made from ``prompt + response``
        carry them: trie and labels agree token for token, and ``labels_allowed_mask`` names the
        first row and position where they do not.

        Args:
            tokenizer: a Hugging Face tokenizer with ``eos_token_id``.
            titles: ``{item id: title}``, or a sequence of titles (item ids 0, 1, ...).
            context: the text a response follows: a prompt up to its response header. Default
                the paper's prompt (``bear.prompts.format_prompt``); for an instruct model
                ``format_prompt(history, PromptText(..., chat=chat_wrap(tokenizer)))``; or the
                user's own prompt text.
            vocab_size: as for ``ItemTrie`` (default: ``len(tokenizer)``); give the model's
                output width (``model.get_output_embeddings().weight.shape[0]``) where its
                embeddings are padded past the tokenizer.

        Raises:
            ValueError if the tokenizer has no EOS, titles is empty or not titles;
            ``bear.items.ContextError`` naming the first title whose tokens merge with the
            context's.
        """
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise ValueError("ItemTrie.from_titles: the tokenizer has no eos_token_id; set one")
        if isinstance(titles, str):
            raise ValueError(
                "ItemTrie.from_titles: titles is one string; give {item id: title} or a list "
                "of titles"
            )
        if not isinstance(titles, Mapping):
            titles = dict(enumerate(titles))
        key = next((k for k in titles if isinstance(k, bool) or not isinstance(k, int)), None)
        if key is not None:
            raise ValueError(f"ItemTrie.from_titles: item id {key!r} is not an integer")
        bad = next(((k, v) for k, v in titles.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise ValueError(f"ItemTrie.from_titles: item {bad[0]}: got {bad[1]!r}, not a title")
        if not titles:
            raise ValueError("ItemTrie.from_titles: `titles` is empty; give at least one title")
        if context is None:
            context = format_prompt(["..."], GENERIC_DOMAIN)
        sequences = title_sequences(tokenizer, titles, context)
        ids = sorted(sequences)
        vocab = len(tokenizer) if vocab_size is None else vocab_size
        return cls([sequences[i] for i in ids], ids, tokenizer.eos_token_id, vocab_size=vocab)

    # ------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return self.child_ptr.device

    @property
    def num_nodes(self) -> int:
        return self.node_parent.shape[0]

    _TENSORS = (
        "node_parent",
        "node_token",
        "node_depth",
        "leaf_item",
        "child_ptr",
        "depth_fanout",
        "_edge_key",
        "_item_sorted",
        "_item_leaf",
        "_root_mask",
        "root_tokens",
    )

    def to(self, device) -> ItemTrie:
        """Return a trie whose tensors live on `device` (self when already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        new = object.__new__(ItemTrie)
        new.__dict__.update(self.__dict__)
        for name in self._TENSORS:
            setattr(new, name, getattr(self, name).to(device))
        new.child_token = new.node_token[1:]
        return new

    def __repr__(self) -> str:
        return (
            f"ItemTrie(num_items={self.num_items}, num_leaves={self.num_leaves}, "
            f"num_nodes={self.num_nodes}, vocab_size={self.vocab_size}, "
            f"eos_token_id={self.eos_token_id}, device={self.device})"
        )

    # ------------------------------------------------------------------ lookups
    def _leaf(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Leaf node of each item id; ValueError for an id not in the catalogue."""
        item_ids = torch.as_tensor(item_ids, dtype=torch.int64, device=self.device)
        pos = torch.searchsorted(self._item_sorted, item_ids.clamp(min=0))
        pos = pos.clamp(max=self._item_sorted.shape[0] - 1)
        found = self._item_sorted[pos] == item_ids
        if not bool(found.all()):
            bad = item_ids[~found][:5].tolist()
            raise ValueError(f"item ids {bad} are not in the trie's catalogue")
        return self._item_leaf[pos]

    def canonical(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Map item ids to the canonical (smallest) id of their leaf; same shape."""
        item_ids = torch.as_tensor(item_ids, dtype=torch.int64, device=self.device)
        return self.leaf_item[self._leaf(item_ids.reshape(-1))].long().reshape(item_ids.shape)

    def child(self, node_ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Child of each (node, token) pair, -1 where the edge does not exist (same shape)."""
        node_ids, tokens = torch.broadcast_tensors(
            torch.as_tensor(node_ids, dtype=torch.int64, device=self.device),
            torch.as_tensor(tokens, dtype=torch.int64, device=self.device),
        )
        ok = (node_ids >= 0) & (tokens >= 0) & (tokens < self.vocab_size)
        key = node_ids.clamp(min=0) * self.vocab_size + tokens.clamp(0, self.vocab_size - 1)
        if self._edge_key.numel() == 0:
            return torch.full_like(node_ids, -1)
        pos = torch.searchsorted(self._edge_key, key).clamp(max=self._edge_key.shape[0] - 1)
        ok &= self._edge_key[pos] == key
        return torch.where(ok, pos + 1, torch.full_like(pos, -1))  # edge pos leads to node pos + 1

    def path_nodes(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Nodes along each item's path: (M,) -> (M, L_max + 1).

        Entry t is the node whose children are the allowed set when predicting token t of the
        item (t = 0 is the root, t = len(seq) is the step whose target is EOS); -1 after that.
        """
        nodes, _ = self._paths(item_ids)
        return nodes

    def item_tokens(self, item_ids: torch.Tensor) -> torch.Tensor:
        """Each item's tokens followed by EOS, padded with -100: (M,) -> (M, L_max + 1)."""
        _, tokens = self._paths(item_ids)
        return tokens

    def _paths(self, item_ids):
        item_ids = torch.as_tensor(item_ids, dtype=torch.int64, device=self.device).reshape(-1)
        width = self.max_len + 1
        cur = self._leaf(item_ids)  # (M,) leaf, depth len+1
        nodes = torch.full((cur.shape[0], width), -1, dtype=torch.int64, device=self.device)
        tokens = torch.full_like(nodes, -100)  # (M, L+1)
        rows = torch.arange(cur.shape[0], device=self.device)
        for _ in range(width):  # walk up one level per iteration, all items at once
            live = cur > 0
            d = self.node_depth[cur]  # depth of cur = column of its token + 1
            col = (d - 1).clamp(min=0)
            parent = self.node_parent[cur].clamp(min=0)
            tokens[rows[live], col[live]] = self.node_token[cur][live].long()
            nodes[rows[live], col[live]] = parent[live].long()
            cur = torch.where(live, parent, cur)
        return nodes, tokens

    # ------------------------------------------------------------------ allowed sets
    def children_dense(self, node_ids: torch.Tensor) -> torch.Tensor:
        """Boolean (N, vocab_size) mask of the child tokens of each node (-1: all False)."""
        node_ids = torch.as_tensor(node_ids, dtype=torch.int64, device=self.device).reshape(-1)
        rows, toks = self._child_pairs(node_ids)
        out = torch.zeros(node_ids.shape[0], self.vocab_size, dtype=torch.bool, device=self.device)
        out[rows, toks] = True
        return out

    def _child_pairs(self, node_ids):
        """(row, token) of every child of every node: one host sync for the total count."""
        valid = node_ids >= 0
        n = node_ids.clamp(min=0)
        start = self.child_ptr[n]
        count = torch.where(valid, self.child_ptr[n + 1] - start, torch.zeros_like(start))
        total = int(count.sum())
        rows = torch.repeat_interleave(
            torch.arange(node_ids.shape[0], device=self.device), count, output_size=total
        )
        offset = torch.arange(total, device=self.device) - torch.repeat_interleave(
            torch.cumsum(count, 0) - count, count, output_size=total
        )
        edge = start[rows] + offset
        return rows, self.child_token[edge].long()

    def allowed_mask(self, node_ids: torch.Tensor) -> torch.Tensor:
        """Pack the child tokens of each node into the SPEC §2 bitmask.

        Token j is allowed in row i iff ``(mask[i, j // 32] >> (j % 32)) & 1``.

        Args:
            node_ids: (N,) int64 node ids; -1 gives an all-zero row.

        Returns:
            (N, ceil(vocab_size / 32)) int32 on the trie's device.
        """
        node_ids = torch.as_tensor(node_ids, dtype=torch.int64, device=self.device).reshape(-1)
        root = node_ids == 0  # (N,) rows served by the stored root row (the widest node)
        mask = self._packed(torch.where(root, -1, node_ids))
        return torch.where(root[:, None], self._root_mask, mask)

    def _packed(self, node_ids: torch.Tensor) -> torch.Tensor:
        """``allowed_mask`` built from the children themselves: O(total fan-out of the rows)."""
        words = (self.vocab_size + 31) // 32
        rows, toks = self._child_pairs(node_ids)
        acc = torch.zeros(node_ids.shape[0], words, dtype=torch.int64, device=self.device)
        # Children of a node are distinct tokens, so adding the bits equals OR-ing them.
        acc.index_put_((rows, toks // 32), torch.ones_like(toks) << (toks % 32), accumulate=True)
        acc = torch.where(acc >= 2**31, acc - 2**32, acc)  # wrap bit 31 into int32's sign bit
        return acc.to(torch.int32)

    def labels_allowed_mask(self, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Allowed-set bitmask of every label position, walking the trie along each row's response.

        Row u's walk starts at the root at its first supervised position t0 (labels[u, t0] !=
        ignore_index) and follows one edge per position: position t holds the children of the node
        reached by labels[u, t0:t], i.e. the allowed set A for predicting labels[u, t]. Positions
        before t0, after an ignored label and after the EOS leaf hold an empty set (no rows count
        there). A causal-LM loss shifts logits, labels and this mask together (SPEC §8).

        Args:
            labels: (batch, T) int64, a catalogue item's tokens then EOS in each row's supervised
                positions (the prompt and the padding set to ignore_index), as Hugging Face's
                `labels`.
            ignore_index: label value of unsupervised positions.

        Returns:
            (batch, T, ceil(vocab_size / 32)) int32 bitmask of SPEC §2, on labels' device (the walk
            runs on the trie's device: `trie.to(labels.device)` avoids the copies).

        Raises:
            TypeError / ValueError for labels that are not a (batch, T) int64 tensor; ValueError
            naming the row, position and token where a supervised label leaves the trie (not a
            catalogue item's next token, or a supervised token after the EOS), or the row whose
            supervised labels end before the item's EOS.
        """
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.dim() != 2 or labels.dtype != torch.int64:
            raise ValueError(
                f"labels must be a (batch, T) int64 tensor, got shape {tuple(labels.shape)} "
                f"and dtype {labels.dtype}"
            )
        out_device = labels.device
        labels = labels.to(self.device)
        batch, length = labels.shape
        supervised = labels != ignore_index  # (batch, T)
        start = torch.where(
            supervised.any(1), supervised.to(torch.int8).argmax(1), length
        )  # (batch,) first supervised position, T where none
        steps = min(length, self.max_len + 1)  # an item's path: its tokens and EOS
        cols = start[:, None] + torch.arange(steps, device=self.device)  # (batch, steps)
        inside = cols < length  # (batch, steps)
        tokens = labels.gather(1, cols.clamp(max=length - 1))  # (batch, steps)
        walked = inside & (tokens != ignore_index)  # (batch, steps) supervised steps of the walk
        tokens = torch.where(walked, tokens, -1)
        nodes = torch.full((batch, steps), -1, dtype=torch.int64, device=self.device)
        node = torch.where(start < length, 0, -1)  # (batch,) the root where a walk starts
        off_trie = torch.zeros(batch, steps, dtype=torch.bool, device=self.device)
        reached = torch.full((batch,), -1, dtype=torch.int64, device=self.device)
        for k in range(steps):  # one trie level per step, all rows at once
            nodes[:, k] = node
            node = self.child(node, tokens[:, k])  # -1 off the trie or after an ignored label
            off_trie[:, k] = walked[:, k] & (node < 0)
            reached = torch.where(walked[:, k], node, reached)  # after the last supervised label
        position = torch.arange(length, device=self.device)  # (T,)
        beyond = supervised & (position[None, :] >= (start + steps)[:, None])  # (batch, T)
        unended = (reached >= 0) & (self.leaf_item[reached.clamp(min=0)] < 0)  # (batch,) no EOS
        flags = torch.stack([off_trie.any(), beyond.any(), unended.any()]).tolist()  # one sync
        if flags[0]:
            u, k = (int(i) for i in off_trie.nonzero()[0])
            raise ValueError(
                f"labels: row {u}, position {int(cols[u, k])} has token {int(tokens[u, k])}, which "
                "is not a next token of any catalogue item after the row's earlier supervised "
                "labels; labels must be an item's tokens then EOS, tokenised as they follow the "
                "prompt (build the trie with ItemTrie.from_titles and the prompt in use)"
            )
        if flags[2] and not flags[1]:
            u = int(unended.nonzero()[0])
            last = int(supervised[u].nonzero()[-1])
            raise ValueError(
                f"labels: row {u} ends at position {last} (token {int(labels[u, last])}) "
                f"without EOS: the trie ends every item with EOS ({self.eos_token_id}); append "
                "tokenizer.eos_token_id to each response's labels (a response cut short by "
                "truncation is refused too; a collator that sets the padding to -100 also hides an "
                "EOS equal to the pad token: give the tokenizer a pad token of its own)"
            )
        if flags[1]:
            u, t = (int(i) for i in beyond.nonzero()[0])
            raise ValueError(
                f"labels: row {u} is supervised at position {t}, beyond the longest item path "
                f"({steps} tokens with EOS) from its first supervised position {int(start[u])}"
            )
        words = (self.vocab_size + 31) // 32
        out = torch.zeros(batch, length, words, dtype=torch.int32, device=self.device)
        rows = torch.arange(batch, device=self.device)[:, None].expand(batch, steps)
        masks = self.allowed_mask(nodes.reshape(-1)).reshape(batch, steps, words)
        out[rows[inside], cols[inside]] = masks[inside]
        return out.to(out_device)

    # ------------------------------------------------------------------ for generate
    def prefix_allowed_tokens_fn(self, prompt_length: int):
        """A ``prefix_allowed_tokens_fn`` for Hugging Face ``generate`` that keeps its output to
        catalogue items (this trie's tokens, then EOS), for users who stay with ``generate``.

        ``prompt_length``: the width of the left-padded prompt batch (``input_ids.shape[1]``):
        generated tokens start there in every row. The function walks the trie along a row's
        generated tokens and returns the children of the node it reaches (EOS alone after an
        item's end, or off the trie, where ``generate`` needs some token).

        Returns:
            fn(batch_id: int, input_ids: (prompt_length + t,) tensor) -> list[int].
        """
        if isinstance(prompt_length, bool) or not isinstance(prompt_length, int):
            raise TypeError(f"prompt_length must be an int, got {type(prompt_length).__name__}")
        ptr, child_token = self.child_ptr.tolist(), self.child_token.tolist()
        eos = self.eos_token_id
        found: dict[tuple[int, ...], list[int]] = {}  # generated prefix -> its allowed tokens

        def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:
            prefix = tuple(input_ids[prompt_length:].tolist())
            if prefix not in found:
                node = 0
                for token in prefix:
                    node = -1 if token == eos else int(self.child(node, token))
                    if node < 0:
                        break
                found[prefix] = child_token[ptr[node] : ptr[node + 1]] if node >= 0 else [eos]
            return found[prefix]

        return allowed
