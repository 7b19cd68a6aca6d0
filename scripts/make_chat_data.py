"""A small synthetic, templated and deterministic chat set (zh/en) for SFT of the shipped model:
greetings and identity, small-number arithmetic, King James verse continuation and quotation,
Tang/Song poem continuation, authorship and recitation, and multi-turn mixes of these.

    python -m scripts.make_chat_data --corpus runs-out/shipped/data --out runs-out/shipped/data/chat.jsonl

Needs ``verses.jsonl`` and ``poems.jsonl`` written by ``scripts.prepare_corpus``.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

NAME = "Megrez2-tiny"
IDENTITY_EN = (f"I am {NAME}, a very small Megrez2 mixture-of-experts model. I was trained on the King James "
               "Bible and classical Chinese poetry, so I can continue verses, recite poems and do simple sums.")
IDENTITY_ZH = f"我是{NAME}，一个很小的Megrez2混合专家模型。我读过钦定版圣经和唐诗宋词，会续写经文、背诵诗词，也会做简单的算术。"
GREETINGS = [
    (["Hello", "Hello!", "Hi", "Hi there!", "Hey", "Good morning", "Good evening"],
     ["Hello! How can I help you today?", "Hi! What would you like to talk about?"]),
    (["Who are you?", "What are you?", "Introduce yourself.", "What is your name?", "Tell me about yourself."],
     [IDENTITY_EN]),
    (["What can you do?", "How can you help me?"],
     ["I can continue verses from the King James Bible, recite Tang and Song poems, and add, subtract or "
      "multiply small numbers. I am small, so please check what I say."]),
    (["Thank you", "Thanks!", "Thank you very much."], ["You are welcome!", "Glad to help."]),
    (["Goodbye", "Bye!", "See you later."], ["Goodbye! Peace be with you.", "See you next time!"]),
    (["你好", "您好", "你好！", "嗨", "早上好", "晚上好"], ["你好！有什么可以帮你的吗？", "你好！想聊点什么？"]),
    (["你是谁？", "你叫什么名字？", "介绍一下你自己。", "你是什么模型？"], [IDENTITY_ZH]),
    (["你会做什么？", "你能帮我做什么？"], ["我可以续写圣经经文、背诵唐诗宋词，也能做简单的加减乘法。我很小，回答请自行核对。"]),
    (["谢谢", "谢谢你！", "多谢"], ["不客气！", "很高兴能帮到你。"]),
    (["再见", "拜拜"], ["再见！祝你一切顺利。", "下次见！"]),
]
FAMOUS = ["Genesis 1:1", "Genesis 1:3", "Exodus 20:13", "Psalms 23:1", "Psalms 23:4", "Psalms 46:1",
          "Psalms 119:105", "Proverbs 3:5", "Proverbs 16:18", "Ecclesiastes 3:1", "Isaiah 40:31", "Matthew 5:9",
          "Matthew 6:33", "Matthew 7:7", "Matthew 22:39", "John 1:1", "John 3:16", "John 8:32", "John 11:35",
          "John 14:6", "Romans 8:28", "Romans 12:21", "1 Corinthians 13:4", "1 Corinthians 13:13",
          "Galatians 6:7", "Philippians 4:13", "Hebrews 11:1", "James 1:17", "1 John 4:8", "Revelation 21:4"]


def arithmetic(rng: random.Random) -> tuple[str, str]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        c, en, zh = a * b, "times", "乘以"
    elif op == "+":
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        c, en, zh = a + b, "plus", "加"
    else:
        a = rng.randint(0, 60)
        b = rng.randint(0, a)
        c, en, zh = a - b, "minus", "减"
    sym = {"*": "×", "+": "+", "-": "-"}[op]
    if rng.random() < 0.5:
        q = rng.choice([f"What is {a} {en} {b}?", f"What is {a} {sym} {b}?", f"Calculate {a} {sym} {b}.",
                        f"{a} {sym} {b} = ?"])
        return q, f"{a} {sym} {b} = {c}."
    q = rng.choice([f"{a}{zh}{b}等于多少？", f"{a}{zh}{b}等于几？", f"请计算{a}{sym}{b}。"])
    return q, f"{a}{zh}{b}等于{c}。"


def verse_task(rng: random.Random, verses: list[dict], by_ref: dict, famous: float) -> tuple[str, str]:
    if rng.random() < famous:
        ref = rng.choice(FAMOUS)
        q = rng.choice([f"Quote {ref}.", f"What does {ref} say?", f"Recite {ref} from the King James Bible."])
        return q, f"{ref}: {by_ref[ref]}"
    while True:
        v = rng.choice(verses)
        words = v["text"].split()
        if 8 <= len(words) <= 40:
            break
    cut = rng.randint(len(words) * 2 // 5, len(words) * 3 // 5)
    head, tail = " ".join(words[:cut]), " ".join(words[cut:])
    q = rng.choice([f'Continue this verse from the King James Bible: "{head}"', f"Finish the verse: {head}",
                    f"Complete this Bible verse: {head} ..."])
    return q, tail


def poem_lines(body: str) -> list[str]:
    return [s for s in re.findall(r"[^，。！？；]+[，。！？；]", body.replace("\n", ""))]


def poem_task(rng: random.Random, poems: list[dict]) -> tuple[str, str]:
    p = rng.choice(poems)
    kind = rng.random()
    lines = poem_lines(p["body"])
    if kind < 0.45 and len(lines) >= 2:
        i = rng.randrange(0, len(lines) - 1)
        first = lines[i].rstrip("，。！？；")
        q = rng.choice([f"续写这句诗：{first}", f"“{first}”的下一句是什么？", f"请接下一句：{first}"])
        return q, lines[i + 1]
    if kind < 0.7:
        q = rng.choice([f"{p['title']}的作者是谁？", f"谁写了{p['title']}？"])
        return q, f"{p['title']}的作者是{p['author']}。"
    if kind < 0.9:
        q = rng.choice([f"背诵{p['author']}的{p['title']}。", f"请背一首诗：{p['title']}。"])
        return q, f"{p['title']}\n作者：{p['author']}\n{p['body']}"
    q = rng.choice(["Recite a Chinese poem.", "给我背一首唐诗。", "Please share a classical Chinese poem."])
    return q, f"{p['title']}\n作者：{p['author']}\n{p['body']}"


def greeting(rng: random.Random) -> tuple[str, str]:
    prompts, answers = rng.choice(GREETINGS)
    return rng.choice(prompts), rng.choice(answers)


def conversation(rng: random.Random, verses, by_ref, poems, weights, famous) -> list[dict]:
    tasks = [lambda: greeting(rng), lambda: arithmetic(rng), lambda: verse_task(rng, verses, by_ref, famous),
             lambda: poem_task(rng, poems)]
    n_turns = rng.choices([1, 2, 3], weights=[0.6, 0.3, 0.1])[0]
    msgs = []
    if rng.random() < 0.1:
        msgs.append({"role": "system", "content": rng.choice(["You are a helpful assistant.", "你是一个乐于助人的助手。"])})
    for _ in range(n_turns):
        q, a = rng.choices(tasks, weights=weights)[0]()
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="runs-out/shipped/data")
    ap.add_argument("--out", default="runs-out/shipped/data/chat.jsonl")
    ap.add_argument("--n", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", nargs=4, type=float, default=[0.15, 0.25, 0.3, 0.3],
                    metavar=("GREET", "ARITH", "VERSE", "POEM"), help="task mix of the user turns")
    ap.add_argument("--famous", type=float, default=0.25,
                    help="share of verse tasks that quote one of a few famous verses (memorisable)")
    a = ap.parse_args()
    corpus = Path(a.corpus)
    verses = [json.loads(x) for x in (corpus / "verses.jsonl").read_text(encoding="utf-8").splitlines()]
    poems = [json.loads(x) for x in (corpus / "poems.jsonl").read_text(encoding="utf-8").splitlines()]
    by_ref = {v["ref"]: v["text"] for v in verses}
    missing = [r for r in FAMOUS if r not in by_ref]
    if missing:
        raise SystemExit(f"{corpus / 'verses.jsonl'}: verses not found: {missing}")
    rng = random.Random(a.seed)
    with open(a.out, "w", encoding="utf-8") as f:
        for _ in range(a.n):
            f.write(json.dumps({"messages": conversation(rng, verses, by_ref, poems, a.weights, a.famous)}, ensure_ascii=False) + "\n")
    print(f"wrote {a.n} conversations to {a.out}")


if __name__ == "__main__":
    main()
