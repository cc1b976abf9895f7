// The official TypeScript SDKs against a running gateway, used as their
// users use them: OpenAI's (chat, completions, embeddings, models,
// Responses, structured outputs, an agent's tool loop) and Anthropic's
// (Messages, count_tokens), each whole and streamed, and the errors each
// throws. .ci/sdk-check runs it on the gateway it starts.
//
//     node .ci/sdk-check.mjs BASE_URL MODULES
//
// MODULES is the node_modules directory holding `openai`,
// `@anthropic-ai/sdk` and `zod` (.ci/run installs them).

import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const [base, modules] = process.argv.slice(2);
const require = createRequire(`${modules}/`);
const { default: OpenAI, NotFoundError, BadRequestError } = require("openai");
const { zodResponseFormat, zodTextFormat, zodFunction } = require("openai/helpers/zod");
const { default: Anthropic } = require("@anthropic-ai/sdk");
const { z } = require("zod");

const CHAT = "llama-3.3-70b";
const EMBED = "bge-m3";

function check(condition, what) {
  if (!condition) {
    throw new Error(`sdk-check.mjs: ${what}`);
  }
}

async function refused(call, kind) {
  try {
    await call();
  } catch (e) {
    check(e instanceof kind, `${kind.name} expected, got ${e}`);
    return e;
  }
  throw new Error(`sdk-check.mjs: served where ${kind.name} was expected`);
}

async function openaiSdk() {
  const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: "unused", maxRetries: 0 });
  const messages = [{ role: "user", content: "Hello" }];

  const whole = await client.chat.completions.create({ model: CHAT, messages });
  check(whole.choices[0].message.content && whole.usage.completion_tokens > 0, "chat: no text or usage");

  let text = "";
  let usage;
  const stream = await client.chat.completions.create({
    model: CHAT, messages, stream: true, stream_options: { include_usage: true },
  });
  for await (const chunk of stream) {
    text += chunk.choices[0]?.delta?.content ?? "";
    usage = chunk.usage ?? usage;
  }
  check(text && usage?.completion_tokens > 0, "chat stream: no text or usage");
  const helped = await client.chat.completions.stream({ model: CHAT, messages }).finalChatCompletion();
  check(helped.choices[0].message.content && helped.choices[0].finish_reason, "chat stream helper");

  const legacy = await client.completions.create({ model: "llama-3.1-8b", prompt: "Once upon", max_tokens: 8 });
  check(legacy.choices[0].text, "completions: no text");

  // The SDK asks for base64 and decodes it.
  const embedded = await client.embeddings.create({ model: EMBED, input: ["first passage", "second"] });
  check(embedded.data.length === 2, "embeddings: not one vector per input");
  const norm = Math.sqrt(embedded.data[0].embedding.reduce((sum, x) => sum + x * x, 0));
  check(Math.abs(norm - 1) < 1e-4, `embeddings: a simulated vector of norm ${norm}`);
  const floats = await client.embeddings.create({ model: EMBED, input: "x", dimensions: 8, encoding_format: "float" });
  check(floats.data[0].embedding.length === 8, "embeddings: dimensions not honoured");

  const ids = [];
  for await (const model of client.models.list()) {
    ids.push(model.id);
  }
  check(ids.includes(CHAT) && ids.includes(EMBED), `models: ${ids}`);
  const embedder = await client.models.retrieve(EMBED);
  check(JSON.stringify(embedder.endpoints) === '["embeddings"]', "models: endpoints");

  const missing = await refused(() => client.chat.completions.create({ model: "no-such-model", messages }), NotFoundError);
  check(missing.error?.type === "invalid_request_error", `404 body: ${JSON.stringify(missing.error)}`);
  const wrong = await refused(() => client.embeddings.create({ model: CHAT, input: "x" }), BadRequestError);
  check(wrong.param === "model", `400 body: ${JSON.stringify(wrong.error)}`);

  const response = await client.responses.create({ model: CHAT, input: "Hello", store: false });
  check(response.status === "completed" && response.output_text && response.usage.total_tokens > 0, "responses");
  const events = [];
  for await (const event of await client.responses.create({ model: CHAT, input: "Hello", stream: true, store: false })) {
    events.push(event);
  }
  const kinds = events.map((e) => e.type);
  check(kinds[0] === "response.created" && kinds.at(-1) === "response.completed", `responses stream: ${kinds}`);
  check(events.every((e, i) => e.sequence_number === i), "responses stream: sequence numbers");
  const final = await client.responses.stream({ model: CHAT, input: "Hello", store: false }).finalResponse();
  check(final.output_text === final.output[0].content[0].text && final.output_text, "responses stream helper");

  // Structured outputs: the SDK's parse, with zod, on chat and Responses.
  const Forecast = z.object({ city: z.string(), days: z.array(z.number().int()), note: z.string().nullable() });
  const parsed = await client.chat.completions.parse({
    model: CHAT, messages, response_format: zodResponseFormat(Forecast, "forecast"),
  });
  check(Forecast.safeParse(parsed.choices[0].message.parsed).success, `chat parse: ${JSON.stringify(parsed.choices[0])}`);
  const parsedResponse = await client.responses.parse({
    model: CHAT, input: "Hello", store: false, text: { format: zodTextFormat(Forecast, "forecast") },
  });
  check(Forecast.safeParse(parsedResponse.output_parsed).success, `responses parse: ${JSON.stringify(parsedResponse.output)}`);

  // An agent's loop: the SDK calls the tool the model asks for and sends
  // its result back, until the model answers in words.
  let calls = 0;
  const weather = zodFunction({
    name: "get_weather",
    parameters: z.object({ city: z.string() }),
    function: ({ city }) => {
      calls += 1;
      check(typeof city === "string", `tool arguments: ${city}`);
      return "18 C, sunny";
    },
  });
  const runner = client.chat.completions.runTools({
    model: CHAT, messages: [{ role: "user", content: "Weather in Paris?" }], tools: [weather],
  });
  const answer = await runner.finalContent();
  check(calls === 1 && answer, `chat runTools: ${calls} calls, answer ${answer}`);
  const streamedRunner = client.chat.completions.runTools({
    model: CHAT, messages: [{ role: "user", content: "Weather in Paris?" }], tools: [weather], stream: true,
  });
  check((await streamedRunner.finalContent()) && calls === 2, "chat runTools streamed");
}

async function anthropicSdk() {
  const client = new Anthropic({ baseURL: base, apiKey: "unused", maxRetries: 0 });
  const messages = [{ role: "user", content: "Hello" }];

  const message = await client.messages.create({ model: CHAT, max_tokens: 64, messages });
  check(message.type === "message" && message.content[0].text && message.usage.output_tokens > 0, "messages");
  const stream = client.messages.stream({ model: CHAT, max_tokens: 64, messages });
  let text = "";
  stream.on("text", (delta) => {
    text += delta;
  });
  const final = await stream.finalMessage();
  check(text && text === final.content[0].text && final.usage.output_tokens > 0, "messages stream");

  const thinking = { type: "enabled", budget_tokens: 1024 };
  const thought = await client.messages.stream({ model: CHAT, max_tokens: 2048, messages, thinking }).finalMessage();
  const blocks = thought.content.map((b) => b.type);
  check(blocks.join() === "thinking,text" && thought.content[0].thinking, `messages stream thinking: ${blocks}`);

  const tools = [{ name: "get_weather", input_schema: { type: "object", properties: { city: { type: "string" } } } }];
  const ask = [{ role: "user", content: "Weather in Paris?" }];
  const called = await client.messages.stream({ model: CHAT, max_tokens: 64, messages: ask, tools }).finalMessage();
  const use = called.content[0];
  check(called.stop_reason === "tool_use" && use.type === "tool_use" && "city" in use.input, `messages tools: ${JSON.stringify(called)}`);
  const answered = await client.messages.create({
    model: CHAT, max_tokens: 64, tools,
    messages: [...ask, { role: "assistant", content: called.content },
      { role: "user", content: [{ type: "tool_result", tool_use_id: use.id, content: "18 C, sunny" }] }],
  });
  check(answered.content[0].type === "text" && answered.content[0].text, "messages tools: no answer");

  const counted = await client.messages.countTokens({ model: CHAT, messages });
  check(counted.input_tokens > 0, "count_tokens");
  const missing = await refused(
    () => client.messages.create({ model: "no-such-model", max_tokens: 8, messages }),
    Anthropic.NotFoundError,
  );
  check(missing.error?.error?.type === "not_found_error", `404 body: ${JSON.stringify(missing.error)}`);
}

await openaiSdk();
await anthropicSdk();
const version = (name) => JSON.parse(readFileSync(`${modules}/${name}/package.json`)).version;
console.log(`openai-node ${version("openai")} and anthropic-sdk-typescript ${version("@anthropic-ai/sdk")} on Node ${process.versions.node}`);
