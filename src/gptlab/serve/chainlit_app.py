"""The chat of `gptlab serve --chainlit`: Chainlit loads this file by its path, in the server's process.

- Replies are greedy (temperature 0): the same conversation always gets the same reply, the one the model
  finds most likely, which is also what a small model gets right most often.
- Each browser session keeps its own conversation (`cl.user_session`); a reply is added to it once it is
  whole (one stopped with the Stop button is left out).
- A run fine-tuned for chat reads the conversation with its own template and ends at its end-of-turn. A
  base run gets the plain `User: ...` / `Assistant:` lines and stops before writing the user's next turn,
  as /v1/chat/completions does: the chat and the API answer the same conversation alike.
- Several served runs are Chainlit chat profiles, one per run.
"""

from __future__ import annotations

import secrets
import warnings

import chainlit as cl

from gptlab.config import SampleConfig
from gptlab.errors import GptlabError
from gptlab.serve import chainlit as shared
from gptlab.serve.limits import Busy
from gptlab.serve.models import ServedModel
from gptlab.serve.openai_api import CHAT_MAX_TOKENS, CHAT_STOP, ChatMessage, chat_prompt


@cl.data_layer
def no_data_layer() -> None:
    """No stored threads: nothing of the conversations is written or sent anywhere."""
    return None


if shared.API_KEY is not None:
    @cl.password_auth_callback
    async def login(username: str, password: str) -> cl.User | None:
        """Any user name, the server's --api-key as the password."""
        if secrets.compare_digest(password.encode(), shared.API_KEY.encode()):
            return cl.User(identifier=username or "user")
        return None


if len(shared.MODELS) > 1:
    # Chainlit also calls this from inside the running event loop, where it cannot run it, and drops the
    # coroutine (the profile's config overrides, which these profiles have none of): a warning per session.
    warnings.filterwarnings("ignore", message="coroutine 'profiles' was never awaited", category=RuntimeWarning)

    @cl.set_chat_profiles
    async def profiles(user: cl.User | None) -> list[cl.ChatProfile]:
        return [cl.ChatProfile(name=name, markdown_description=m.card()) for name, m in shared.MODELS.items()]


def served() -> ServedModel:
    """The model of this session: its chat profile, or the only one."""
    return shared.MODELS.get(cl.user_session.get("chat_profile") or "") or next(iter(shared.MODELS.values()))


@cl.on_chat_start
async def start() -> None:
    cl.user_session.set("history", [])


@cl.on_message
async def reply(message: cl.Message) -> None:
    history: list[dict[str, str]] = cl.user_session.get("history")
    turn = [*history, {"role": "user", "content": message.content}]
    limit = shared.LIMITS.max_prompt_chars
    if sum(len(m["content"]) for m in turn) > limit:
        await cl.ErrorMessage(content=f"This conversation is over {limit:,} characters, the most this server "
                                      "reads: start a new chat.").send()
        return
    model = served()
    chats = model.model.chats
    prompt = turn if chats else chat_prompt([ChatMessage(**m) for m in turn])
    config = SampleConfig(max_new_tokens=min(CHAT_MAX_TOKENS, shared.LIMITS.max_new_tokens_limit), temperature=0.0,
                          stop=() if chats else (CHAT_STOP,), max_new_tokens_limit=shared.LIMITS.max_new_tokens_limit)
    answer = cl.Message(content="")
    try:
        # Stop cancels this coroutine; the job then stops at its next token (Job's own cleanup).
        async for _, piece, _ in model.queue.submit(lambda: model.work([prompt], config)):
            if piece:
                await answer.stream_token(piece)
    except Busy as e:
        await cl.ErrorMessage(content=f"{e} (in about {e.retry_after} s)").send()
        return
    except GptlabError as e:  # e.g. a character the run's tokenizer has never seen
        await cl.ErrorMessage(content=str(e)).send()
        return
    await answer.send()
    cl.user_session.set("history", [*turn, {"role": "assistant", "content": answer.content}])
