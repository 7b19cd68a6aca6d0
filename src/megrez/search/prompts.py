"""The prompts of Megrez's web search, byte for byte as the model was trained with them
(InfiniWebSearch): the search function, the per-page summary request, the observation that
carries the numbered summaries, and the canned observations of the failure paths."""
from __future__ import annotations

SEARCH_FUNCTION = {
    "name": "googleWebSearch",
    "description": (
        "A Google Search Engine. "
        "Useful when you need to search information you don't know such as weather, "
        "exchange rate, current events."
        "Never ever use this tool when user want to translate"
    ),
    "parameters": {
        "type": "object",
        "properties": {
            "query": {
                "type": "string",
                "description": (
                    "Content that users want to search for, such as 'weather', 'current events', etc."
                    "If special characters such as '\n' appear in the search, "
                    "these special characters must be ignored."
                ),
            }
        },
        "required": ["query"],
    },
}

SUMMARY_SYSTEM = "You are a helpful assistant."
SUMMARY_PROMPT = (
    '从信息中总结能够回答问题的相关内容，要求简明扼要不能完全照搬原文。直接返回总结不要说其他话，如果没有相关内容则返回"无相关内容", 返回内容为中文。\n\n'
    "<问题>{question}</问题>\n"
    "<信息>{context}</信息>"
)

OBSERVATION_PROMPT = (
    "You will be given a set of related contexts to the question, "
    "each starting with a reference number like [[citation:x]], where x is a number. "
    "Please use the context and cite the context at the end of each sentence if applicable."
    "\n\n"
    "Please cite the contexts with the reference numbers, in the format [citation:x]. "
    "If a sentence comes from multiple contexts, please list all applicable citations, like [citation:3][citation:5]. "
    "If the context does not provide relevant information to answer the question, "
    "inform the user that there is no relevant information in the search results and that the question cannot be "
    "answered."
    "\n\n"
    "Other than code and specific names and citations, your answer must be written in Chinese."
    "\n\n"
    "Ensure that your response is concise and clearly formatted. "
    "Group related content together and use Markdown points or lists where appropriate."
    "\n\n"
    "Remember, summarize and don't blindly repeat the contexts verbatim. And here is the user question:\n"
    "{question}\n"
    "Here is the keywords of the question:\n"
    "{keywords}"
    "\n\n"
    "Here are the set of contexts:"
    "\n\n"
    "{context}"
)

PAGES_TIMED_OUT = "搜索页面加载超时, 请重试"                 # every page failed, or none came back
SEARCH_FAILED = '输出"websearch server发生错误, 请重试"'      # the backend raised
MISSING_QUERY = "调用工具失败, 缺乏必要输入参数, 请重试"        # a call without "query"
UNKNOWN_TOOL = "{name}不在可以使用的工具列表中"


def observation(question: str, keywords: str, summaries: list[str]) -> str:
    context = "\n".join(f"[[citation:{i}]]\n{s}" for i, s in enumerate(summaries, 1))
    return OBSERVATION_PROMPT.format(question=question, keywords=keywords, context=context)
