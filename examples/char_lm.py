"""A character-level language model (LSTM, GRU, RevGRU or RevLSTM), trained online with truncated BPTT(k1, k2).

Run it with `python -m examples.char_lm` (about 3 minutes on 2 CPU cores; `--help` lists the
settings). The text is Python's own documentation, the help topics that ship with every CPython
(`pydoc_data.topics`), so nothing is downloaded. The model is built from Cells:

    model = with_readout(embedding(stacked(lstm(H), lstm(H)), vocab, dim), vocab)

and trained with `online_tbptt` on B parallel streams of text held batch-major (`time_axis=1`):
every k1 characters the parameters are updated with the gradient of those k1 losses, backpropagated
through the last k2 characters. At the start of every pass over the text, `reset` starts new
streams and keeps the parameters and the optimizer's state. At the end it reports bits per
character on held-out text (the last tenth) against a unigram baseline, and samples from the model.

`--cell revgru` / `--cell revlstm` train the reversible cells of MacKay et al. (2018) instead, with
at most `--max-forget-bits` bits forgotten per unit per step. Training needs no inversion, so their
buffers hold a single word (`max_steps=1`: the forward values and gradients do not depend on it). At
the end, `--memory-length L` measures what reversibility is for: the temporary memory (XLA's
`memory_analysis`) of one exact-BPTT gradient of the recurrent layer over L characters, storing every
step (`remat=None`) and, for the reversible cells, rebuilding the carries instead (`remat=Invert()`,
the buffer then sized for L steps).
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from pydoc_data.topics import topics
from tqdm.auto import tqdm

import jaxbptt as jb


def load_text(chars: int) -> str:
    return "\n\n".join(topics[k] for k in sorted(topics))[:chars]


def cross_entropy(logits, ids):
    """Mean over the batch of -log p(next character), in nats."""
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[..., None], axis=-1))


def as_streams(ids: np.ndarray, batch: int) -> np.ndarray:
    """Cut a sequence into `batch` contiguous streams, batch-major: shape (batch, len // batch)."""
    n = len(ids) // batch
    return ids[: n * batch].reshape(batch, n)


CELLS = {"lstm": jb.lstm, "gru": jb.gru, "revgru": jb.revgru, "revlstm": jb.revlstm}


def make_cell(args, max_steps: int = 1) -> jb.Cell:
    if args.cell.startswith("rev"):
        return CELLS[args.cell](args.hidden, max_forget_bits=args.max_forget_bits, max_steps=max_steps)
    return CELLS[args.cell](args.hidden)


def gradient_memory(args, vocab: int) -> dict:
    """Temp bytes of one exact-BPTT gradient of the recurrent layer (and its readout) over
    `args.memory_length` steps of embedded characters, per memory policy."""
    length = args.memory_length
    model = jb.with_readout(make_cell(args, max_steps=length), vocab)
    params = model.init(jax.random.key(0), args.embed)
    xs = jnp.zeros((length, args.batch, args.embed))
    targets = jnp.zeros((length, args.batch), jnp.int32)
    policies = {"None": None, **({"Invert()": jb.Invert()} if args.cell.startswith("rev") else {})}
    memory = {}
    for name, remat in policies.items():
        f = jax.jit(jb.value_and_grad(model.step, cross_entropy, remat=remat, engine="reverse"))
        compiled = f.lower(params, model.initial_carry((args.batch,)), xs, targets).compile()
        memory[name] = compiled.memory_analysis().temp_size_in_bytes
    return memory


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m examples.char_lm", description=__doc__.split("\n")[0])
    p.add_argument("--chars", type=int, default=400_000, help="characters of text (train + held-out)")
    p.add_argument("--cell", choices=sorted(CELLS), default="lstm", help="the recurrent cell of every layer")
    p.add_argument("--max-forget-bits", type=int, default=3, help="revgru / revlstm: bits forgotten per unit per step")
    p.add_argument("--memory-length", type=int, default=0,
                   help="if > 0, also measure one exact-BPTT gradient's memory over this many characters")
    p.add_argument("--hidden", type=int, default=256, help="units per layer")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--embed", type=int, default=32, help="embedding dimension")
    p.add_argument("--batch", type=int, default=32, help="parallel streams")
    p.add_argument("--k1", type=int, default=25, help="update every k1 characters")
    p.add_argument("--k2", type=int, default=50, help="backpropagate through k2 characters")
    p.add_argument("--steps", type=int, default=4000, help="characters per stream to train on")
    p.add_argument("--chunks-per-call", type=int, default=8, help="chunks of k1 per compiled update call")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--sample", type=int, default=400, help="characters to sample at the end")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    start = time.perf_counter()
    text = load_text(args.chars)
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = np.array([index[c] for c in text], np.int32)
    split = int(0.9 * len(ids))
    train, held_out = ids[:split], ids[split:]
    V = len(vocab)
    counts = np.bincount(train, minlength=V) + 1.0  # add-one, so unseen characters cost finite bits
    unigram_bpc = float(-np.mean(np.log2((counts / counts.sum())[held_out])))

    model = jb.with_readout(jb.embedding(jb.stacked(*[make_cell(args)] * args.layers), V, args.embed), V)
    key_init, key_sample = jax.random.split(jax.random.key(args.seed))
    params = model.init(key_init, V)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(args.lr))
    trainer = jb.online_tbptt(model.step, cross_entropy, optimizer, truncation=(args.k1, args.k2), time_axis=1)
    update = jax.jit(trainer.update)

    streams = as_streams(train, args.batch)
    chunk = args.k1 * args.chunks_per_call
    per_pass = (streams.shape[1] - 1) // chunk
    if per_pass < 1:
        raise ValueError(f"--chars {args.chars} leaves streams shorter than one call of {chunk} characters.")
    calls = max(1, args.steps // chunk)
    carry = model.initial_carry((args.batch,))
    state = trainer.init(params, carry, streams[:, :chunk])
    losses = []
    bar = tqdm(range(calls), desc="training", unit="call")
    for call in bar:
        if call and call % per_pass == 0:
            state = trainer.reset(state, carry)  # a new pass over the text: fresh streams, same model
        t0 = (call % per_pass) * chunk
        xs, targets = streams[:, t0 : t0 + chunk], streams[:, t0 + 1 : t0 + chunk + 1]
        state, chunk_losses = update(state, xs, targets)
        losses.append(chunk_losses)
        bar.set_postfix(bpc=f"{float(jnp.mean(chunk_losses)) / math.log(2):.3f}")

    evaluation = as_streams(held_out, 8)
    _, logits = jb.unroll(model.step, state.params, model.initial_carry((8,)), evaluation[:, :-1], time_axis=1)
    test_bpc = float(cross_entropy(logits, evaluation[:, 1:])) / math.log(2)
    train_bpc = float(jnp.mean(jnp.concatenate(losses[-max(1, calls // 10):]))) / math.log(2)

    prompt = jnp.asarray([index[c] for c in "The "], jnp.int32)[:, None]
    sample = jb.generate(model.step, state.params, model.initial_carry((1,)), prompt, args.sample,
                         key=key_sample, temperature=0.7)
    sample = "The " + "".join(vocab[int(i)] for i in sample[:, 0])
    seconds = time.perf_counter() - start
    print(f"\n{args.cell}, {args.layers} x {args.hidden} units: {len(train)} training characters, vocabulary {V}, "
          f"{calls * chunk} steps of {args.batch} streams, truncation=({args.k1}, {args.k2}), {seconds:.0f} s")
    print(f"bits per character on held-out text: {test_bpc:.3f} (unigram baseline {unigram_bpc:.3f}); "
          f"training, last tenth: {train_bpc:.3f}")
    print(f"\nsample (temperature 0.7):\n{sample}")
    memory = gradient_memory(args, V) if args.memory_length > 0 else {}
    if memory:
        print(f"\none exact-BPTT gradient of one {args.cell} layer over {args.memory_length} characters, batch "
              f"{args.batch}: temp memory " + ", ".join(f"remat={k} {v / 1e6:.2f} MB" for k, v in memory.items()))
    return {"test_bpc": test_bpc, "unigram_bpc": unigram_bpc, "train_bpc": train_bpc, "seconds": seconds,
            "sample": sample, "memory": memory}


if __name__ == "__main__":
    main()
