"""IFEval-style instruction following: prompts carrying verifiable instructions ("answer in
lowercase", "at least 3 highlighted sections", "end with 'Is there anything else?'"), scored
as IFEval does: prompt-level strict accuracy (every instruction followed; the task's
accuracy), instruction-level strict accuracy, and both again in the loose setting.

Data: IFEval-format JSONL (``prompt``, ``instruction_id_list``, ``kwargs``; google/IFEval's
``input_data.jsonl`` as it is, if you have it) via ``data=FILE``; without it, a small built-in
set of prompts written for this project (``BUILTIN``), in English and Chinese.
"""
from __future__ import annotations

from .base import Example, Grade, Task, TaskError, field_of, read_jsonl
from .ifeval_checks import CHECKS, check, loose_variants

BUILTIN = [
    ("Write a short greeting to a friend. Your entire response should be in English, and in all lowercase letters.",
     ["change_case:english_lowercase"], [{}]),
    ("Describe the sea in two sentences. Do not use any commas in your response.",
     ["punctuation:no_comma"], [{}]),
    ("Tell me about the moon. Answer with at least 20 words.",
     ["length_constraints:number_words"], [{"num_words": 20, "relation": "at least"}]),
    ("What is a river? Answer in less than 15 words.",
     ["length_constraints:number_words"], [{"num_words": 15, "relation": "less than"}]),
    ("Write a title for a poem about spring, wrapped in double angular brackets, such as <<poem of joy>>.",
     ["detectable_format:title"], [{}]),
    ("List three fruits as a markdown bullet list with exactly 3 bullet points, like:\n* This is a point.",
     ["detectable_format:number_bullet_lists"], [{"num_bullets": 3}]),
    ('Give the name and age of a person as JSON. Wrap your entire output in JSON format.',
     ["detectable_format:json_format"], [{}]),
    ("Write a note about bread. End your response with the exact phrase \"Is there anything else I can help with?\"",
     ["startend:end_checker"], [{"end_phrase": "Is there anything else I can help with?"}]),
    ("Say something about the king. Wrap your entire response with double quotation marks.",
     ["startend:quotation"], [{}]),
    ("Is the sky blue? Answer with one of: My answer is yes., My answer is no., My answer is maybe.",
     ["detectable_format:constrained_response"], [{}]),
    ("Write a letter to a shepherd. At the end of your response, please add a postscript starting with P.S.",
     ["detectable_content:postscript"], [{"postscript_marker": "P.S."}]),
    ("Write a short story about a city. Include the keywords light and water.",
     ["keywords:existence"], [{"keywords": ["light", "water"]}]),
    ("Describe a mountain without using the words snow or cold.",
     ["keywords:forbidden_words"], [{"forbidden_words": ["snow", "cold"]}]),
    ("Write a template of an invitation with at least 2 placeholders in square brackets, such as [name].",
     ["detectable_content:number_placeholders"], [{"num_placeholders": 2}]),
    ("Explain why bread rises. Highlight at least 2 sections with markdown, i.e. *highlighted section*.",
     ["detectable_format:number_highlighted_sections"], [{"num_highlights": 2}]),
    ("WRITE A SHORT MOTTO FOR A SHIP. YOUR ENTIRE RESPONSE SHOULD BE IN ENGLISH AND IN ALL CAPITAL LETTERS.",
     ["change_case:english_capital"], [{}]),
    ("First repeat the request word for word without change, then give your answer: What is a lamp?",
     ["combination:repeat_prompt"], [{"prompt_to_repeat": "What is a lamp?"}]),
    ("Give two different short descriptions of the night. Separate them with six asterisk symbols: ******",
     ["combination:two_responses"], [{}]),
    ("用中文介绍一下月亮。你的回答必须全部使用中文。",
     ["language:response_language"], [{"language": "zh"}]),
    ("写一首关于春天的短诗，不要使用任何逗号（,）。",
     ["punctuation:no_comma"], [{}]),
    ("Write about the wind in exactly 2 paragraphs separated by the markdown divider: ***",
     ["length_constraints:number_paragraphs"], [{"num_paragraphs": 2}]),
    ("Write a poem about the sun in lowercase letters only, and include the word gold.",
     ["change_case:english_lowercase", "keywords:existence"], [{}, {"keywords": ["gold"]}]),
    ("Describe a garden in less than 3 sentences and end with the phrase \"That is all.\"",
     ["length_constraints:number_sentences", "startend:end_checker"],
     [{"num_sentences": 3, "relation": "less than"}, {"end_phrase": "That is all."}]),
    ("Write two sections about bread, mark the beginning of each with SECTION X, such as: SECTION 1.",
     ["detectable_format:multiple_sections"], [{"section_spliter": "SECTION", "num_sections": 2}]),
]


class IFEval(Task):
    name = "ifeval"
    max_tokens = 512
    metric_keys = ("prompt_loose", "inst_strict", "inst_loose")

    def __init__(self, data: str | None = None):
        self.data = data

    def examples(self) -> list[Example]:
        rows = []
        if self.data:
            for lineno, obj in read_jsonl(self.data):
                where = f"{self.data}:{lineno}"
                ids = field_of(obj, ("instruction_id_list",), where, list)
                kwargs = obj.get("kwargs") or [{} for _ in ids]
                if len(kwargs) != len(ids):
                    raise TaskError(f"{where}: 'kwargs' must have one entry per instruction id")
                unknown = [i for i in ids if i not in CHECKS]
                if unknown:
                    raise TaskError(f"{where}: unsupported instruction(s) {', '.join(unknown)}")
                rows.append((str(obj.get("key", lineno)), field_of(obj, ("prompt",), where), ids, kwargs))
        else:
            rows = [(f"builtin-{i}", p, ids, kw) for i, (p, ids, kw) in enumerate(BUILTIN)]
        return [Example(key, prompt, None, {"ids": ids, "kwargs": kw}) for key, prompt, ids, kw in rows]

    def grade(self, ex: Example, response: str) -> Grade:
        ids, kwargs = ex.meta["ids"], ex.meta["kwargs"]
        strict = [check(i, response, kw) for i, kw in zip(ids, kwargs)]
        variants = loose_variants(response)
        loose = [any(check(i, v, kw) for v in variants) for i, kw in zip(ids, kwargs)]
        return Grade(all(strict), extracted=response if response.strip() else None,
                     detail={"prompt_loose": float(all(loose)), "inst_strict": [float(x) for x in strict],
                             "inst_loose": [float(x) for x in loose]})

    def describe(self) -> dict:
        return {"task": self.name, "data": str(self.data) if self.data else "built-in"}
