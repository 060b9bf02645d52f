"""VLM judge: score images by asking a vision-language model served behind an OpenAI-compatible chat API.

Source model: whatever the endpoint serves (e.g. Qwen2.5-VL under vLLM or SGLang, or a hosted API); nothing
is loaded locally. Requests go to `<base_url>/chat/completions` with the image as a base64 data URL (PNG by
default) next to a text built from `prompt_template`.

Measures: what the template asks. The default template asks how well the image matches its prompt on a 0-10
scale. The first number in the reply (or the first group of `score_pattern`) is the score; it must lie in
[0, max_score] and is divided by `max_score` (so rewards are in [0, 1]) unless `normalize=False`.

Failures are never scored 0: connection errors, timeouts, HTTP 408/429/5xx and replies without a valid number
are retried `max_retries` times with exponential backoff, then a `RemoteRewardError` is raised naming the
endpoint and the last error (so training stops instead of learning from made-up rewards). Other HTTP errors
(e.g. 401, 404) raise at once.

Dataset columns: none required; the template may use any column by name (`{prompt}` is the prompt), e.g.
`"Does this image show {count} {object}? ..."`. Literal braces are written `{{` and `}}`.

Videos (a completion that is a list of frames): `video="strip"` (default) sends one image, a strip of up to
`video_frames` evenly spaced frames side by side (first and last included); `video="mp4"` sends the video itself as
an OpenAI-style `video_url` content part holding a `data:video/mp4;base64,...` URL (needs the `video` extra; vLLM
accepts it for video-capable models such as Qwen2.5-VL). The template may use `{fps}`.

Configuration of the registry name `vlm_judge`: `TRL_FLOW_VLM_BASE_URL` (default `http://127.0.0.1:8000/v1`),
`TRL_FLOW_VLM_MODEL` (required) and the API key in `OPENAI_API_KEY` (optional; sent as a bearer token), read on
each call. For other settings create one with [`make_vlm_judge`] in a file of yours.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from reward_funcs._common import check_lengths
from reward_funcs._http import RemoteRewardError, encode_image, post_json
from trl_flow.errors import UserInputError
from trl_flow.video import DEFAULT_FPS, frame_strip, is_video, video_data_url

__all__ = [
    "DEFAULT_TEMPLATE",
    "RemoteRewardError",
    "VlmJudge",
    "make_vlm_judge",
    "parse_score",
    "vlm_judge",
]

DEFAULT_TEMPLATE = (
    'On a scale from 0 to 10, how well does this image match the description "{prompt}"? Consider the objects, '
    "their attributes, counts and positions, and the image quality. Answer with a single number only."
)
"""The default question sent with each image."""

BASE_URL_ENV = "TRL_FLOW_VLM_BASE_URL"
MODEL_ENV = "TRL_FLOW_VLM_MODEL"
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")


def parse_score(reply: str, max_score: float, pattern: str | re.Pattern[str] | None = None) -> float:
    """The score in a judge's reply: the first number (or `pattern`'s first group), which must be in [0, max_score].

    Raises:
        ValueError: no number, or a number out of range.
    """
    if pattern is not None:
        match = re.search(pattern, reply)
        text = match.group(1) if match and match.groups() else (match.group(0) if match else None)
    else:
        match = _NUMBER.search(reply)
        text = match.group(0) if match else None
    if text is None:
        raise ValueError(f"no score found in the judge's reply {reply[:200]!r}")
    try:
        value = float(text)
    except ValueError as e:
        raise ValueError(f"'{text}' in the judge's reply is not a number") from e
    if not 0.0 <= value <= max_score:
        raise ValueError(f"score {value} in the judge's reply {reply[:200]!r} is outside [0, {max_score}]")
    return value


class VlmJudge:
    """Reward callable asking an OpenAI-compatible VLM endpoint for a score per image. See the module docstring.

    Args:
        base_url: API root, e.g. "http://127.0.0.1:8000/v1" (the full ".../chat/completions" URL works too);
            None reads `$TRL_FLOW_VLM_BASE_URL`, falling back to http://127.0.0.1:8000/v1.
        model: model name sent in each request; None reads `$TRL_FLOW_VLM_MODEL`.
        prompt_template: the question; `{prompt}` and `{<column>}` are filled per sample.
        system_prompt: optional system message.
        api_key: bearer token; None reads the environment variable `api_key_env` (if set).
        api_key_env: where to read the key when `api_key` is None.
        max_score: top of the scale the template asks for.
        normalize: divide scores by `max_score`.
        score_pattern: regular expression whose first group is the score (default: first number).
        timeout: seconds to connect and for each read.
        max_retries: retries per image after the first attempt.
        backoff: first pause between attempts in seconds (doubled each retry, at most 30 s).
        max_concurrency: requests in flight at once.
        temperature: sampling temperature sent to the endpoint.
        max_tokens: reply length limit sent to the endpoint.
        image_format: "PNG" (lossless) or "JPEG" (smaller).
        extra_body: more fields merged into each request (e.g. vLLM sampling options).
        video: how a video completion is sent: "strip" (one image of `video_frames` frames) or "mp4".
        video_frames: frames in a strip.
        name: the reward's `__name__` (TRL logs `rewards/<name>/mean`).
    """

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        prompt_template: str = DEFAULT_TEMPLATE,
        system_prompt: str | None = None,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        max_score: float = 10.0,
        normalize: bool = True,
        score_pattern: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_concurrency: int = 8,
        temperature: float = 0.0,
        max_tokens: int = 16,
        image_format: str = "PNG",
        extra_body: dict[str, Any] | None = None,
        video: str = "strip",
        video_frames: int = 8,
        name: str = "vlm_judge",
    ) -> None:
        if video not in ("strip", "mp4"):
            raise UserInputError(f"reward '{name}': video must be 'strip' or 'mp4', got {video!r}.")
        if isinstance(video_frames, bool) or not isinstance(video_frames, int) or video_frames < 1:
            raise UserInputError(f"reward '{name}': video_frames must be a positive integer, got {video_frames!r}.")
        self.video, self.video_frames = video, video_frames
        if max_score <= 0:
            raise UserInputError(f"reward '{name}': max_score must be positive, got {max_score}.")
        if max_retries < 0 or max_concurrency < 1 or timeout <= 0:
            raise UserInputError(
                f"reward '{name}': need max_retries >= 0, max_concurrency >= 1 and timeout > 0 "
                f"(got {max_retries}, {max_concurrency}, {timeout})."
            )
        if score_pattern is not None:
            try:
                re.compile(score_pattern)
            except re.error as e:
                raise UserInputError(f"reward '{name}': score_pattern is not a valid regular expression: {e}") from e
        self.__name__ = name
        self.base_url = base_url
        self.model = model
        self.prompt_template = prompt_template
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(prompt_template) if f is not None]
        except ValueError as e:
            raise UserInputError(
                f"reward '{name}': bad prompt template ({e}); write literal braces as {{{{ }}}}."
            ) from e
        if any(not f or f.isdigit() for f in fields):
            raise UserInputError(
                f"reward '{name}': the prompt template must name its fields ({{prompt}}, {{column}}), not use {{}}."
            )
        self.template_fields = fields
        self.system_prompt = system_prompt
        self.api_key = api_key
        self.api_key_env = api_key_env
        self.max_score = float(max_score)
        self.normalize = normalize
        self.score_pattern = score_pattern
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_concurrency = int(max_concurrency)
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.image_format = image_format
        self.extra_body = dict(extra_body or {})

    def __repr__(self) -> str:
        return f"VlmJudge(name={self.__name__!r}, base_url={self.base_url!r}, model={self.model!r})"

    def endpoint(self) -> str:
        """The chat-completions URL requests go to."""
        base = (self.base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    def model_name(self) -> str:
        """The model name sent with each request."""
        model = self.model or os.environ.get(MODEL_ENV)
        if not model:
            raise UserInputError(
                f"reward '{self.__name__}' needs the name of the model the endpoint serves: set {MODEL_ENV} or use "
                "make_vlm_judge(model=...)."
            )
        return model

    def _texts(self, prompts: Sequence[Any], kwargs: dict[str, Any]) -> list[str]:
        texts = []
        for i, prompt in enumerate(prompts):
            values: dict[str, Any] = {}
            for field in self.template_fields:
                key = re.split(r"[.\[!:]", field, maxsplit=1)[0]
                if key == "prompt":
                    values["prompt"] = prompt
                elif key in kwargs and isinstance(kwargs[key], Sequence) and not isinstance(kwargs[key], str):
                    values[key] = kwargs[key][i]
                elif key in kwargs and isinstance(kwargs[key], (int, float, str)):  # one value for all, e.g. fps
                    values[key] = kwargs[key]
                else:
                    raise UserInputError(
                        f"reward '{self.__name__}': the prompt template uses {{{key}}}, but the dataset has no "
                        f"column '{key}'. Add the column, or write literal braces as {{{{ and }}}}."
                    )
            texts.append(self.prompt_template.format(**values))
        return texts

    def _media(self, completion: Any, fps: float | None) -> dict[str, Any]:
        """The content part showing one completion: an image, a video's frame strip, or a video's mp4."""
        if is_video(completion) and self.video == "mp4":
            return {"type": "video_url", "video_url": {"url": video_data_url(completion, fps or DEFAULT_FPS)}}
        if is_video(completion):
            completion = frame_strip(completion, max_frames=self.video_frames, min_height=1)
        data_url = f"data:image/{'jpeg' if self.image_format.upper() in ('JPEG', 'JPG') else 'png'};base64,"
        return {"type": "image_url", "image_url": {"url": data_url + encode_image(completion, self.image_format)}}

    def _ask(
        self, url: str, model: str, headers: dict[str, str], text: str, image: Any, fps: float | None = None
    ) -> float:
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": [self._media(image, fps), {"type": "text", "text": text}]})
        payload = {
            "model": model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            **self.extra_body,
        }

        def check(response: Any) -> float:
            try:
                content = response["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError) as e:
                raise ValueError(
                    f"unexpected reply shape (no choices[0].message.content): {str(response)[:200]}"
                ) from e
            if isinstance(content, list):  # some servers return content parts
                content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
            return parse_score(str(content or ""), self.max_score, self.score_pattern)

        score = post_json(
            url,
            payload,
            what=f"reward '{self.__name__}'",
            headers=headers,
            timeout=self.timeout,
            max_retries=self.max_retries,
            backoff=self.backoff,
            check=check,
        )
        return score / self.max_score if self.normalize else score

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        """Ask the judge about every image (concurrently, at most `max_concurrency` at a time)."""
        check_lengths(prompts, completions, self.__name__)
        texts = self._texts(prompts, kwargs)
        if not completions:
            return []
        url, model = self.endpoint(), self.model_name()
        key = self.api_key if self.api_key is not None else os.environ.get(self.api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        fps = kwargs.get("fps")
        if len(completions) == 1 or self.max_concurrency == 1:
            return [self._ask(url, model, headers, t, image, fps) for t, image in zip(texts, completions, strict=True)]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(completions))) as pool:
            futures = [
                pool.submit(self._ask, url, model, headers, t, image, fps)
                for t, image in zip(texts, completions, strict=True)
            ]
            return [future.result() for future in futures]


def make_vlm_judge(
    base_url: str | None = None,
    model: str | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    system_prompt: str | None = None,
    api_key: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    max_score: float = 10.0,
    normalize: bool = True,
    score_pattern: str | None = None,
    timeout: float = 60.0,
    max_retries: int = 3,
    backoff: float = 1.0,
    max_concurrency: int = 8,
    temperature: float = 0.0,
    max_tokens: int = 16,
    image_format: str = "PNG",
    extra_body: dict[str, Any] | None = None,
    video: str = "strip",
    video_frames: int = 8,
    name: str = "vlm_judge",
) -> VlmJudge:
    """Create a VLM-judge reward; nothing is contacted until its first call. Arguments: see [`VlmJudge`]."""
    return VlmJudge(
        base_url=base_url,
        model=model,
        prompt_template=prompt_template,
        system_prompt=system_prompt,
        api_key=api_key,
        api_key_env=api_key_env,
        max_score=max_score,
        normalize=normalize,
        score_pattern=score_pattern,
        timeout=timeout,
        max_retries=max_retries,
        backoff=backoff,
        max_concurrency=max_concurrency,
        temperature=temperature,
        max_tokens=max_tokens,
        image_format=image_format,
        extra_body=extra_body,
        video=video,
        video_frames=video_frames,
        name=name,
    )


vlm_judge = make_vlm_judge()
"""The built-in `vlm_judge` reward, configured from `$TRL_FLOW_VLM_BASE_URL` / `$TRL_FLOW_VLM_MODEL`."""
