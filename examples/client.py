"""Talk to a tova-vllm server (examples/serve.sh) with the `openai` client:
a chat completion, a streamed completion, a request with its own budget and
policy (vllm_xargs), a rejected one, and the server's tova_vllm:* metrics.

    python examples/client.py [--url http://127.0.0.1:8000]
"""

from __future__ import annotations

import argparse
import urllib.request

import openai


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key="unused")
    model = client.models.list().data[0].id

    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me a short story about a lighthouse keeper."}],
        max_tokens=96,
        temperature=0.0,
    )
    print("chat:", chat.choices[0].message.content.strip())
    print(f"  ({chat.usage.prompt_tokens} prompt + {chat.usage.completion_tokens} completion tokens)")

    print("stream: ", end="", flush=True)
    stream = client.completions.create(
        model=model, prompt="The history of the lighthouse", max_tokens=48, temperature=0.0, stream=True
    )
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].text, end="", flush=True)
    print()

    # A request may keep fewer tokens than the server's --kv-budget, and pick
    # another policy (tova, window, sink, h2o).
    own = client.completions.create(
        model=model,
        prompt="List the planets of the solar system:",
        max_tokens=48,
        temperature=0.0,
        extra_body={"vllm_xargs": {"kv_budget": 32, "kv_policy": "window"}},
    )
    print("window, budget 32:", own.choices[0].text.strip())

    try:
        client.completions.create(
            model=model, prompt="Hi", max_tokens=4, extra_body={"vllm_xargs": {"kv_budget": 1_000_000}}
        )
    except openai.BadRequestError as e:
        print(f"rejected with HTTP {e.status_code}: {e.body.get('message') if isinstance(e.body, dict) else e}")

    with urllib.request.urlopen(f"{args.url}/metrics") as r:
        metrics = r.read().decode()
    print("metrics:")
    for line in metrics.splitlines():
        if line.startswith("tova_vllm:"):
            print(" ", line)


if __name__ == "__main__":
    main()
