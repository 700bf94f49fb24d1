"""The properties FedRAG gets wrong, each checked by a test that fails if they break."""

import random

import pytest
import torch
from conftest import FACTS, make_client, write_jsonl

from fedrag_app.data import QAPair, resolve_clients
from fedrag_app.finetune.loop import (
    LoopSettings,
    length_grouped_batches,
    prepared_batches,
    run_loop,
)
from fedrag_app.finetune.lsr import LsrLoss
from fedrag_app.finetune.ralt import Example, RaltLoss, raft_examples, ralt_examples
from fedrag_app.rag.generator import IGNORE, Generator
from fedrag_app.rag.store import Hit, KnowledgeStore
from fedrag_app.task import build_generator, build_retriever, open_store, train_local


def _pairs(client):
    return [(0, p) for p in client.qa("train")]


def test_lsr_gradient_reaches_query_encoder_only(tiny_settings, toy_root):
    client = resolve_clients([toy_root / "client-a"])[0]
    retriever, generator = build_retriever(tiny_settings), build_generator(tiny_settings)
    with open_store(client, tiny_settings, retriever, progress=False) as store:
        loss_fn = LsrLoss(retriever, generator, [store], k=3, gamma=0.05, tau=1.0)
        loss, tokens = loss_fn(_pairs(client)[:4])
        assert loss.requires_grad and loss.item() >= 0 and tokens > 0
        loss.backward()
        grads = [p.grad for p in retriever.trainable_parameters().values()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
        assert all(p.grad is None for p in retriever.context_encoder.parameters())
        assert all(p.grad is None for p in generator.model.parameters())


def test_one_lsr_step_changes_query_not_context_encoder(tiny_settings, toy_root):
    client = resolve_clients([toy_root / "client-a"])[0]
    retriever, generator = build_retriever(tiny_settings), build_generator(tiny_settings)
    query_before = {k: v.clone() for k, v in retriever.trainable_state().items()}
    context_before = {k: v.clone() for k, v in retriever.context_encoder.state_dict().items()}
    lora_before = {k: v.clone() for k, v in generator.trainable_state().items()}
    train_local([client], tiny_settings.replace(mode="retriever", local_steps=1, ret_lr=1e-3),
                retriever, generator, progress=False)  # fmt: skip
    assert any(not torch.equal(query_before[k], v) for k, v in retriever.trainable_state().items())
    assert all(
        torch.equal(context_before[k], v) for k, v in retriever.context_encoder.state_dict().items()
    )
    assert all(torch.equal(lora_before[k], v) for k, v in generator.trainable_state().items())


def test_ralt_labels_mask_prompt_and_context(tiny_settings):
    generator = build_generator(tiny_settings)
    ids, labels = generator.encode_example("What does TCP stand for?", ["TCP: Transmission Control Protocol."],
                                           "Transmission Control Protocol")  # fmt: skip
    prompt = generator.tokenizer(generator.prompt("What does TCP stand for?", ["TCP: Transmission Control Protocol."]),
                                 add_special_tokens=False)["input_ids"]  # fmt: skip
    assert ids[: len(prompt)] == prompt
    assert all(label == IGNORE for label in labels[: len(prompt)])
    answer = labels[len(prompt) :]
    assert answer == ids[len(prompt) :] and IGNORE not in answer
    assert (
        generator.tokenizer.decode(answer, skip_special_tokens=True)
        == "Transmission Control Protocol"
    )
    assert answer[-1] == generator.tokenizer.eos_token_id  # the model learns to stop


def test_ralt_makes_k_examples_per_pair_and_only_lora_trains(tiny_settings):
    pair = QAPair("q?", ("ans",))
    hits = [
        [Hit(i, f"d{i}", "", f"text {i} ans" if i == 1 else f"text {i}", 1.0) for i in range(3)]
    ]
    examples = ralt_examples([pair], hits, k=3)
    assert [e.contexts for e in examples] == [("text 0",), ("text 1 ans",), ("text 2",)]
    assert [e.has_gold for e in examples] == [False, True, False]
    generator = build_generator(tiny_settings)
    trainable = generator.trainable_parameters()
    assert trainable and all("lora_" in k for k in trainable)


def test_raft_includes_gold_at_the_configured_rate():
    rng = random.Random(0)
    pairs = [QAPair(f"q{i}", ("gold",)) for i in range(2000)]
    hits = [[Hit(j, f"d{j}", "", "the gold chunk" if j == 2 else f"distractor {j}", 1.0) for j in range(5)]
            for _ in pairs]  # fmt: skip
    for p in (0.0, 0.3, 0.8):
        examples = raft_examples(pairs, hits, p, distractors=2, rng=rng)
        rate = sum(e.has_gold for e in examples) / len(examples)
        assert abs(rate - p) < 0.04, (p, rate)
        assert all(len(e.contexts) == (3 if e.has_gold else 2) for e in examples)
        assert all(("the gold chunk" in e.contexts) == e.has_gold for e in examples)


@pytest.mark.slow
def test_a_few_steps_lower_the_ralt_loss_of_the_real_generator(tiny_settings, real_paths):
    generator = build_generator(tiny_settings.replace(generator_model=real_paths["generator"]))
    examples = [
        Example(f"What is item {i}?", (f"Item {i} is called thing{i}.",), f"thing{i}")
        for i in range(4)
    ]
    loss_fn = RaltLoss(generator, 256)
    before = loss_fn(examples)[0].item()
    batches = length_grouped_batches(examples, loss_fn.length, 4, random.Random(0))
    run_loop(generator.trainable_parameters(), batches, loss_fn,
             LoopSettings(steps=8, lr=2e-3, warmup_ratio=0.0, progress=False))  # fmt: skip
    after = loss_fn(examples)[0].item()
    assert after < before - 0.5, (before, after)


def test_length_grouping_reduces_padding():
    rng = random.Random(0)
    items = [rng.randint(5, 500) for _ in range(256)]
    grouped = length_grouped_batches(items, lambda x: x, 8, rng)
    padded = sum(max(b) * len(b) for b in (next(grouped) for _ in range(32)))
    naive = sum(max(items[i : i + 8]) * 8 for i in range(0, 256, 8))
    assert padded < 0.6 * naive


def test_proximal_term_pulls_towards_the_global_weights():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(4))
    target = torch.ones(4)

    def loss_fn(_):
        return ((w - target) ** 2).sum(), 1

    def train(mu):
        w.data.zero_()
        run_loop({"w": w}, iter(range(10**6)), loss_fn,
                 LoopSettings(steps=200, lr=0.05, warmup_ratio=0.0, max_grad_norm=0, proximal_mu=mu, progress=False))  # fmt: skip
        return w.detach().clone()

    free, prox = train(0.0), train(2.0)
    assert torch.allclose(free, target, atol=0.05)
    assert torch.allclose(prox, target / 2, atol=0.05)  # argmin of |w-1|^2 + |w|^2


def _step_sizes(rounds: int, steps: int, **schedule) -> list[float]:
    """Per-step moves of w under a constant gradient: AdamW then moves w by exactly the lr."""
    w = torch.nn.Parameter(torch.zeros(1))
    seen: list[float] = []

    def loss_fn(_):
        seen.append(w.item())
        return w.sum(), 1

    for r in range(rounds):
        extra = {k: v(r) for k, v in schedule.items()}
        run_loop({"w": w}, iter(range(10**6)), loss_fn,
                 LoopSettings(steps=steps, lr=0.01, max_grad_norm=0, progress=False, **extra))  # fmt: skip
    seen.append(w.item())
    return [round(a - b, 6) for a, b in zip(seen, seen[1:], strict=False)]


def test_client_sgd_moves_the_weights_by_the_lr_times_the_summed_gradients():
    """client-optimizer=sgd: a round's update is lr x the sum of its gradients (a server
    optimizer's pseudo-gradient), where AdamW moves each weight by about the lr whatever the
    gradient's size; no optimizer state is kept."""
    targets = torch.tensor([[10.0, -0.1], [20.0, 0.3]])
    moved = {}
    for optimizer in ("sgd", "adamw"):
        w = torch.nn.Parameter(torch.zeros(2))
        state: dict[str, torch.Tensor] = {}
        cfg = LoopSettings(steps=2, lr=0.1, warmup_ratio=0.0, max_grad_norm=0, progress=False,
                           optimizer=optimizer, schedule_total=2)  # fmt: skip
        res = run_loop(
            {"w": w}, iter(range(2)), lambda i, w=w: ((w * targets[i]).sum(), 1), cfg, state
        )
        moved[optimizer] = w.detach().clone()
        if optimizer == "sgd":
            assert state == {} and res["optimizer_steps"] == 0.0
    # gradients are the targets; the second step's lr is halved by the linear decay over 2 steps
    assert torch.allclose(moved["sgd"], -(0.1 * targets[0] + 0.05 * targets[1]))
    assert moved["adamw"][0].abs() < 0.2 < moved["sgd"][0].abs()  # AdamW: about lr per step
    # lr-schedule=constant: no warmup, no decay, mid-run as at the start
    w = torch.nn.Parameter(torch.zeros(2))
    cfg = LoopSettings(steps=2, lr=0.1, warmup_ratio=0.5, max_grad_norm=0, progress=False,
                       optimizer="sgd", schedule="constant", schedule_start=4, schedule_total=6)  # fmt: skip
    run_loop({"w": w}, iter(range(2)), lambda i: ((w * targets[i]).sum(), 1), cfg)
    assert torch.allclose(w.detach(), -0.1 * (targets[0] + targets[1]))


def test_run_schedule_continues_across_rounds_as_one_long_run():
    one_run = _step_sizes(1, 30)
    federated = _step_sizes(6, 5, schedule_start=lambda r: 5 * r, schedule_total=lambda r: 30)
    restarted = _step_sizes(6, 5)
    assert federated == pytest.approx(one_run, abs=1e-5)
    assert one_run[3] == pytest.approx(0.01, abs=1e-5) and one_run[-1] < 0.001  # warm, decayed
    assert restarted[5] == pytest.approx(0.01, abs=1e-5)  # round 2 starts at the peak again


def _adam_rounds(rounds: int, steps: int, carry: bool) -> tuple[torch.Tensor, list[float]]:
    """A noisy quadratic (a new target every step) trained in ``rounds`` calls of ``steps``."""
    w = torch.nn.Parameter(torch.zeros(3))
    targets = torch.randn(rounds * steps, 3, generator=torch.Generator().manual_seed(0))
    batches = iter(range(rounds * steps))
    state: dict[str, torch.Tensor] | None = {} if carry else None
    counts = []
    for r in range(rounds):
        cfg = LoopSettings(steps=steps, lr=0.05, max_grad_norm=0, progress=False,
                           schedule_start=r * steps, schedule_total=rounds * steps)  # fmt: skip
        res = run_loop({"w": w}, batches, lambda i: (((w - targets[i]) ** 2).sum(), 1), cfg, state)
        counts.append(res["optimizer_steps"])
    return w.detach().clone(), counts


def test_carried_adam_state_makes_rounds_one_long_run():
    """With its moments carried over, 4 calls of 5 steps are exactly one run of 20 steps."""
    one_run, _ = _adam_rounds(1, 20, carry=False)
    carried, carried_counts = _adam_rounds(4, 5, carry=True)
    restarted, restarted_counts = _adam_rounds(4, 5, carry=False)
    assert torch.allclose(carried, one_run, atol=1e-6)
    assert carried_counts == [5, 10, 15, 20] and restarted_counts == [5, 5, 5, 5]
    assert not torch.allclose(restarted, one_run, atol=1e-3)  # fresh Adam each round differs


@pytest.mark.parametrize(("schedule", "server_round", "expected"),
                         [("run", 3, (10, 20)), ("round", 3, (0, 0)), ("run", 0, (0, 0))])  # fmt: skip
def test_a_client_places_its_steps_in_the_run_schedule(
    tiny_settings, toy_root, monkeypatch, schedule, server_round, expected
):
    """Round r of a 4 x 5 run covers steps [5(r-1), 5r) of 20; centralized (round 0) owns its own."""
    import fedrag_app.task as task

    seen = []
    monkeypatch.setattr(
        task, "run_loop", lambda params, batches, loss, cfg, *_, **__: seen.append(cfg) or {}
    )
    client = resolve_clients([toy_root / "client-a"])[0]
    s = tiny_settings.replace(
        mode="generator", local_steps=5, num_server_rounds=4, lr_schedule=schedule
    )
    train_local([client], s, build_retriever(s), build_generator(s), False, server_round)
    assert [(c.schedule_start, c.schedule_total) for c in seen] == [expected]


def test_answer_only_loss_matches_the_plain_full_sequence_computation(tiny_settings):
    """The fast path (left padding, LM head on the answer positions only) equals HF's own loss
    with labels -100 on prompt and context, example by example."""
    from fedrag_app.rag.generator import pad_batch

    generator = build_generator(tiny_settings)
    generator.model.eval()
    examples = [Example("What does TCP stand for?", ("TCP: Transmission Control Protocol.",), "Transmission Control Protocol"),
                Example("Who?", ("A much longer context " * 20,), "Ana")]  # fmt: skip
    loss_fn = RaltLoss(generator, 512)
    with torch.no_grad():
        for ex in examples:
            ids, labels, mask = pad_batch([loss_fn.encode(ex)], generator.tokenizer.pad_token_id)
            reference = generator.model(input_ids=ids, attention_mask=mask, labels=labels).loss
            assert torch.allclose(loss_fn([ex])[0], reference, atol=1e-5)
        batch_scores = generator.answer_logprobs(
            [(e.question, list(e.contexts), e.answer) for e in examples]
        )
        single = torch.cat(
            [
                generator.answer_logprobs([(e.question, list(e.contexts), e.answer)])
                for e in examples
            ]
        )
        assert torch.allclose(batch_scores, single, atol=1e-4)  # left padding changes nothing


def test_lsr_per_token_target_divides_by_each_answers_length(tiny_settings):
    """lsr-target = mean scores a candidate by log p(answer) per answer token (Atlas), so a long
    answer does not make the LM's preference one-hot; sum keeps the summed likelihood."""
    generator = build_generator(tiny_settings)
    encoded = [
        generator.encode_example("What does TCP stand for?", ["TCP: Transmission Control Protocol."], "Transmission Control Protocol"),
        generator.encode_example("Who?", ["Ana wrote it."], "Ana"),
    ]  # fmt: skip
    lengths = torch.tensor([sum(label != IGNORE for label in labels) for _, labels in encoded])
    assert lengths[0] > lengths[1] > 0
    summed = generator.encoded_logprobs(encoded)
    per_token = generator.encoded_logprobs(encoded, mean=True)
    assert torch.allclose(per_token * lengths, summed, atol=1e-5)
    assert not torch.allclose(per_token, summed)


@pytest.mark.parametrize("mode", ["both", "generator"])
def test_a_round_prepares_only_what_its_steps_train(tiny_settings, tmp_path, monkeypatch, mode):
    """A site with 40x the QA pairs retrieves and tokenizes as much per round as a small one:
    the round's pairs are drawn first, then only they are retrieved and encoded."""
    counts = {"search": 0, "encode": 0}
    search, encode = KnowledgeStore.search, Generator.encode_example

    def counting_search(self, vectors, k, with_vectors=False):
        counts["search"] += len(vectors)
        return search(self, vectors, k, with_vectors)

    def counting_encode(self, *args, **kwargs):
        counts["encode"] += 1
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(KnowledgeStore, "search", counting_search)
    monkeypatch.setattr(Generator, "encode_example", counting_encode)
    s = tiny_settings.replace(mode=mode, local_steps=3)
    seen = []
    for n in (10, 400):
        site = make_client(tmp_path / f"site-{n}", FACTS)
        facts = [FACTS[i % len(FACTS)] for i in range(n)]
        qa = [{"question": f"Q{i}: what does {t} stand for?", "answers": [e]}
              for i, (t, e, _) in enumerate(facts)]  # fmt: skip
        write_jsonl(site / "train.jsonl", qa)
        retriever, generator = build_retriever(s), build_generator(s)
        metrics = train_local(resolve_clients([site]), s, retriever, generator, progress=False)
        assert metrics["num-examples"] == n and metrics["gen-steps"] == 3
        seen.append(dict(counts))
        counts.update(search=0, encode=0)
    assert seen[0]["encode"] == seen[1]["encode"], seen  # tokenized: the round's examples only
    per_round = s.local_steps * s.batch_size  # examples the steps train on
    # fits() and the loss encode each drawn example once; LSR scores lsr-k candidates each
    assert 0 < seen[1]["encode"] <= per_round * ((s.lsr_k + 3) if mode == "both" else 2)
    assert all(0 < x["search"] <= 2 * per_round for x in seen), seen  # a round's questions only
    # local-epochs: a round's steps in proportion to the site's pairs (here 400)
    e = s.replace(local_epochs=0.05)
    metrics = train_local(resolve_clients([site]), e, retriever, generator, progress=False)
    assert metrics["gen-steps"] == round(0.05 * 400 / (s.batch_size * s.grad_accum)) != 3
    # data-order=run: the position a round hands on counts what it went through
    position = {"seed": 0}
    r = s.replace(data_order="run")
    for round_ in (1, 2):
        train_local(
            resolve_clients([site]), r, retriever, generator, False, round_, None, None, position
        )
        stages = ("ret", "gen") if mode == "both" else ("gen",)
        assert all(0 < position[k] <= round_ * 2 * per_round * s.top_k for k in stages), position


def test_prepared_batches_are_full_prepare_lazily_and_fail_when_nothing_fits():
    prepared = []

    def prepare(items):
        prepared.extend(items)
        return [x for x in items if x % 7 != 0]  # multiples of 7 "do not fit"

    batches = prepared_batches(list(range(1, 41)), prepare, lambda x: x, 4, 6, random.Random(0))
    first = [next(batches) for _ in range(3)]
    assert all(len(b) == 4 for b in first) and len(prepared) <= 18  # only what was reached
    epoch = first + [next(batches) for _ in range(5)]  # 35 fit: 8 full batches, 3 carried
    assert all(len(b) == 4 for b in epoch) and len(set(sum(epoch, []))) == 32
    assert len(prepared) == 40 and not {7, 14, 21, 28, 35} & set(sum(epoch, []))
    tiny = prepared_batches([1, 2, 3], list, lambda x: x, 4, 8, random.Random(0))
    assert sorted(next(tiny)) == [1, 2, 3]  # fewer than one batch: one short batch
    with pytest.raises(ValueError, match="fits"):
        next(prepared_batches([7, 14], prepare, lambda x: x, 4, 8, random.Random(0)))


def test_run_order_continues_one_pass_across_calls():
    """data-order=run: a site's rounds, each a new call that starts where the last one's
    preparation stopped, go through every item once before any repeats, as one call does."""
    items, seen = list(range(40)), []

    def round_(start: int, steps: int) -> int:
        consumed = []

        def prepare(xs):
            consumed.extend(xs)
            return list(xs)

        rng = random.Random(start)  # each round's own rng: only the batch order depends on it
        batches = prepared_batches(items, prepare, lambda x: x, 4, 8, rng, (3, start))
        seen.extend(x for _ in range(steps) for x in next(batches))
        return start + len(consumed)

    position = 0
    for _ in range(5):  # 5 rounds of 2 steps x 4: one pass over the 40 items
        position = round_(position, 2)
    assert position == 40 and sorted(seen) == items
    once = prepared_batches(items, list, lambda x: x, 4, 8, random.Random(9), (3, 0))
    one_call = [x for _ in range(10) for x in next(once)]
    assert sorted(one_call) == items  # one call: the same pass (batch order aside)
    fresh = []  # data-order=round: each round a fresh shuffle, so items repeat within 40
    for r in range(5):
        batches = prepared_batches(items, list, lambda x: x, 4, 8, random.Random(r))
        fresh.extend(x for _ in range(2) for x in next(batches))
    assert len(set(fresh)) < 40


def test_gradient_checkpointing_gives_the_same_gradients(tiny_settings):
    """Less memory for the same step: activations are recomputed in backward, not changed."""
    ex = [Example("What does TCP stand for?", ("TCP is a protocol.",), "Transmission Control")]
    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        generator = build_generator(tiny_settings.replace(gradient_checkpointing=on))
        assert generator.model.is_gradient_checkpointing == on
        torch.manual_seed(1)
        loss, _ = RaltLoss(generator, 256)(ex)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in generator.trainable_parameters().items()})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    assert any(g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name
    with pytest.raises(ValueError, match="gradient-checkpointing"):
        tiny_settings.replace(gradient_checkpointing=True, dp="record")


def test_micro_batches_give_the_whole_batchs_gradient(tiny_settings):
    """Pieces of a batch, each weighted by its share of the answer tokens: the same update as
    the whole batch in one pass, so memory follows micro-batch-tokens and results do not."""
    from fedrag_app.finetune.loop import micro_batches

    batch = [
        Example("What does TCP stand for?", ("TCP is a protocol " * 6,), "Transmission Control"),
        Example(
            "Who made Unix?", ("Unix came from Bell Labs.",), "Ken Thompson and Dennis Ritchie"
        ),
        Example("What is a byte?", ("Eight bits.",), "eight bits"),
    ]
    s = tiny_settings.replace(lora_dropout=0.0)  # dropout would draw other masks per piece
    loss_fn = RaltLoss(build_generator(s), 256)
    pieces = micro_batches(batch, loss_fn, max(loss_fn.length(e) for e in batch))
    assert [len(p) for p, _ in pieces] == [1, 1, 1]
    assert sum(share for _, share in pieces) == pytest.approx(1.0)
    assert micro_batches(batch, loss_fn, 0) == [(batch, 1.0)]
    finals = []
    for budget in (0, 1):  # 1 token: every example a piece of its own
        torch.manual_seed(0)
        generator = build_generator(s)
        loss_fn = RaltLoss(generator, 256)
        res = run_loop(generator.trainable_parameters(), iter([batch] * 3), loss_fn,
                       LoopSettings(steps=3, lr=1e-2, micro_batch_tokens=budget, progress=False))  # fmt: skip
        finals.append((res, {k: v.clone() for k, v in generator.trainable_state().items()}))
    (whole, w), (pieced, p) = finals
    assert whole["loss"] == pytest.approx(pieced["loss"], rel=1e-5)
    assert whole["tokens"] == pieced["tokens"]
    for name in w:
        assert torch.allclose(w[name], p[name], atol=1e-6), name
    # and the test can fail: weighting each piece alike is NOT the batch's gradient
    torch.manual_seed(0)
    generator = build_generator(s)
    loss_fn = RaltLoss(generator, 256)
    loss_fn.weight = len  # type: ignore[method-assign]  # every piece 1/3: a mean of means
    run_loop(generator.trainable_parameters(), iter([batch] * 3), loss_fn,
             LoopSettings(steps=3, lr=1e-2, micro_batch_tokens=1, progress=False))  # fmt: skip
    assert any(
        not torch.allclose(w[k], v, atol=1e-6) for k, v in generator.trainable_state().items()
    )


def test_the_shared_prompt_prefix_runs_once_with_the_same_logprobs_and_gradients(tiny_settings):
    """Every prompt opens with the same template: the batch runs it once (batch 1) and repeats
    its keys and values, and the answer log-probs and LoRA gradients stay what they were."""
    from fedrag_app.rag.generator import IGNORE, shared_prefix_length

    batch = [
        Example("What does TCP stand for?", ("TCP is a protocol " * 6,), "Transmission Control"),
        Example("Who made Unix?", ("Unix came from Bell Labs.",), "Ken Thompson"),
        Example("What is a byte?", ("Eight bits.",), "eight bits"),
    ]
    generator = build_generator(tiny_settings.replace(lora_dropout=0.0))
    loss_fn = RaltLoss(generator, 256)
    encoded = [loss_fn.encode(e) for e in batch]
    shared = loss_fn.shared(batch)
    first_answer = min(y.index(next(v for v in y if v != IGNORE)) for _, y in encoded)
    assert 8 <= shared < first_answer  # the template, never a row's last prompt token
    assert all(x[:shared] == encoded[0][0][:shared] for x, _ in encoded)
    assert encoded[0][0][shared] != encoded[1][0][shared] or shared == first_answer - 1
    assert shared_prefix_length(encoded[:1]) == 0
    results = []
    for share in (False, True):
        generator.model.zero_grad(set_to_none=True)
        logp, valid = generator.answer_token_logprobs(encoded, share_prefix=share)
        (-logp.sum() / valid.sum()).backward()
        grads = {n: p.grad.clone() for n, p in generator.trainable_parameters().items()}
        results.append((logp.detach(), valid, grads))
    (plain, valid, g0), (fast, valid_fast, g1) = results
    assert torch.equal(valid, valid_fast) and valid.sum() > 0
    assert torch.allclose(plain, fast, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in g0.values())
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-6, rtol=1e-4), name
    # DP-SGD needs every activation per example: no sharing there
    assert RaltLoss(generator, 256, per_example=True).shared(batch) == 0


def test_the_prefix_is_shared_only_where_it_attends_as_before(tiny_settings):
    """Checkpointed layers recompute without a cache, and a sliding window or a conv layer
    would see the padding between the prefix and a row: no sharing there."""
    from transformers import LlamaConfig, MistralConfig

    from fedrag_app.rag.generator import plain_attention_cache

    assert plain_attention_cache(LlamaConfig())
    assert not plain_attention_cache(MistralConfig(sliding_window=8))
    generator = build_generator(tiny_settings.replace(gradient_checkpointing=True))
    ex = Example("What is a byte?", ("Eight bits.",), "eight bits")
    assert RaltLoss(generator, 256).shared([ex, ex]) == 0


def test_micro_batches_count_the_shared_prefix_once():
    """A pass runs the batch's shared tokens once, so a piece may hold more rows."""
    from fedrag_app.finetune.loop import micro_batches

    class Loss:
        length = staticmethod(lambda item: 100)
        weight = staticmethod(len)

        def __init__(self, shared: int) -> None:
            self.shared = lambda items: shared

    batch = list(range(4))
    assert [len(p) for p, _ in micro_batches(batch, Loss(0), 250)] == [2, 2]
    assert [len(p) for p, _ in micro_batches(batch, Loss(40), 250)] == [3, 1]  # 40 + 3 x 60
    assert [len(p) for p, _ in micro_batches(batch, Loss(40), 280)] == [4]
