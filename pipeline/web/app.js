// The voice page: a recorded or uploaded clip -> POST /v1/chat/completions (OpenAI chat format, the clip as an
// input_audio part, the instruction as a text part, stream: true) -> the answer appended as each server-sent
// chunk arrives. The endpoint reads wav/mp3/flac: those files go as they are; a recording (MediaRecorder gives
// webm/ogg) or any other format the browser decodes is resampled to 16 kHz mono and sent as 16-bit PCM WAV.
"use strict";

(() => {
  const ENDPOINT = "v1/chat/completions";
  const MODELS = "v1/models";
  const RATE = 16000; // the encoder's rate: converting at it keeps the upload small
  const NATIVE = { wav: ["audio/wav", "audio/x-wav", "audio/wave"], mp3: ["audio/mpeg", "audio/mp3"],
    flac: ["audio/flac", "audio/x-flac"] };

  const $ = (id) => document.getElementById(id);
  const el = {
    form: $("ask-form"), record: $("record"), recordStatus: $("record-status"), file: $("file"),
    preview: $("preview"), clipStatus: $("clip-status"), instruction: $("instruction"),
    temperature: $("temperature"), maxTokens: $("max-tokens"), seed: $("seed"), ask: $("ask"), stop: $("stop"),
    error: $("error"), answer: $("answer"), answerStatus: $("answer-status"), modelStatus: $("model-status"),
    maxSeconds: $("max-seconds"),
  };

  let clip = null; // {blob, format, label}
  let model = null; // the served model's name, from GET /v1/models when the server lists one
  let maxSeconds = 30; // the longest clip the server answers: its model's `max_audio_seconds` (Whisper's 30 s if unsaid)
  let recorder = null;
  let controller = null;

  // --- audio -------------------------------------------------------------------------------------------

  /** 16-bit little-endian PCM WAV of mono float samples in [-1, 1]. */
  function encodeWav(samples, rate) {
    const view = new DataView(new ArrayBuffer(44 + samples.length * 2));
    const text = (offset, s) => { for (let i = 0; i < s.length; i++) view.setUint8(offset + i, s.charCodeAt(i)); };
    text(0, "RIFF"); view.setUint32(4, 36 + samples.length * 2, true); text(8, "WAVE");
    text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
    view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true); view.setUint16(32, 2, true);
    view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, samples.length * 2, true);
    for (let i = 0; i < samples.length; i++) {
      const s = Math.max(-1, Math.min(1, samples[i]));
      view.setInt16(44 + i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
    }
    return new Blob([view], { type: "audio/wav" });
  }

  /** Any audio the browser decodes -> 16 kHz mono WAV (decodeAudioData resamples to the context's rate; rendering
   *  into a one-channel destination down-mixes), at most `limit` seconds of it (rendering stops at the context's
   *  length). */
  async function toWav(blob, limit = Infinity) {
    let decoded;
    try {
      decoded = await new OfflineAudioContext(1, 1, RATE).decodeAudioData(await blob.arrayBuffer());
    } catch {
      throw new Error("this browser cannot decode the audio; use a WAV, MP3 or FLAC file");
    }
    const ctx = new OfflineAudioContext(1, Math.max(1, Math.min(decoded.length, Math.floor(limit * RATE))), RATE);
    const source = ctx.createBufferSource();
    source.buffer = decoded;
    source.connect(ctx.destination);
    source.start();
    const mono = await ctx.startRendering();
    return { blob: encodeWav(mono.getChannelData(0), RATE), seconds: mono.duration };
  }

  /** "wav" | "mp3" | "flac" when the endpoint reads the file as it is, else null. */
  function nativeFormat(file) {
    const ext = (file.name.match(/\.([a-z0-9]+)$/i) || [])[1];
    for (const [format, types] of Object.entries(NATIVE)) {
      if (types.includes(file.type) || (ext && ext.toLowerCase() === format)) return format;
    }
    return null;
  }

  function setClip(blob, format, label) {
    clip = { blob, format, label };
    if (el.preview.src) URL.revokeObjectURL(el.preview.src);
    el.preview.src = URL.createObjectURL(blob);
    el.preview.hidden = false;
    el.clipStatus.textContent = `Ready: ${label}`;
    el.ask.disabled = controller !== null;
  }

  function clearClip(message) {
    clip = null;
    el.preview.hidden = true;
    el.clipStatus.textContent = message;
    el.ask.disabled = true;
  }

  async function onFile() {
    const file = el.file.files[0];
    if (!file) { clearClip("No audio chosen yet."); return; }
    const format = nativeFormat(file);
    if (format) { setClip(file, format, `${file.name} (${kb(file.size)})`); return; }
    el.clipStatus.textContent = `Converting ${file.name} to WAV…`;
    try {
      const wav = await toWav(file);
      setClip(wav.blob, "wav", `${file.name}, converted to WAV (${wav.seconds.toFixed(1)} s)`);
    } catch (err) {
      clearClip(`${file.name}: ${err.message}`);
    }
  }

  // --- microphone --------------------------------------------------------------------------------------

  async function startRecording() {
    if (!navigator.mediaDevices || !window.MediaRecorder) {
      el.recordStatus.textContent = "Recording needs a secure page (https or localhost) in a browser with "
        + "MediaRecorder; upload a file instead.";
      return;
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (err) {
      el.recordStatus.textContent = `No microphone: ${err.message}`;
      return;
    }
    const chunks = [];
    const started = Date.now();
    recorder = new MediaRecorder(stream);
    recorder.ondataavailable = (e) => { if (e.data.size) chunks.push(e.data); };
    const tick = setInterval(() => {
      const s = (Date.now() - started) / 1000;
      el.recordStatus.textContent = `Recording… ${s.toFixed(0)} s (stops at ${maxSeconds} s)`;
      if (s >= maxSeconds) stopRecording();
    }, 250);
    recorder.onstop = async () => {
      clearInterval(tick);
      stream.getTracks().forEach((t) => t.stop());
      recorder = null;
      el.record.textContent = "Record";
      delete el.record.dataset.recording;
      el.recordStatus.textContent = "Converting the recording to WAV…";
      try {
        // The recorder stops at the first tick past the limit, a fraction of a second over: cut that off, or the
        // server would refuse the clip as too long.
        const wav = await toWav(new Blob(chunks, { type: chunks[0] ? chunks[0].type : "audio/webm" }), maxSeconds);
        el.file.value = "";
        setClip(wav.blob, "wav", `recording (${wav.seconds.toFixed(1)} s)`);
        el.recordStatus.textContent = "Recorded.";
      } catch (err) {
        el.recordStatus.textContent = `The recording could not be used: ${err.message}`;
      }
    };
    recorder.start(250);
    el.record.textContent = "Stop recording";
    el.record.dataset.recording = "";
  }

  function stopRecording() {
    if (recorder && recorder.state !== "inactive") recorder.stop();
  }

  // --- the request ---------------------------------------------------------------------------------------

  function base64(blob) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1));
      reader.onerror = () => reject(new Error("could not read the audio"));
      reader.readAsDataURL(blob);
    });
  }

  async function requestBody() {
    const content = [{ type: "input_audio", input_audio: { data: await base64(clip.blob), format: clip.format } }];
    const instruction = el.instruction.value.trim();
    if (instruction) content.push({ type: "text", text: instruction });
    const body = { messages: [{ role: "user", content }], stream: true, stream_options: { include_usage: true } };
    await modelReady;
    if (model) body.model = model;
    const temperature = parseFloat(el.temperature.value);
    if (Number.isFinite(temperature)) body.temperature = temperature;
    const maxTokens = parseInt(el.maxTokens.value, 10);
    if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens;
    const seed = parseInt(el.seed.value, 10);
    if (Number.isFinite(seed)) body.seed = seed;
    return body;
  }

  /** The message of an OpenAI-style error body ({"error": {"message": ...}}), else the response text. */
  async function errorMessage(res) {
    const text = await res.text();
    try {
      const err = JSON.parse(text).error;
      if (err && err.message) return `${res.status}: ${err.message}`;
    } catch { /* not JSON: show the text */ }
    const plain = text && !/html/i.test(res.headers.get("Content-Type") || "");
    return `${res.status} ${res.statusText}${plain ? `: ${text.slice(0, 500)}` : ""}`;
  }

  /** A server-sent-events line parser: feed it decoded text; it calls onData with each event's data. */
  function sseParser(onData) {
    let buffer = "";
    let data = [];
    const line = (l) => {
      if (l === "") { if (data.length) onData(data.join("\n")); data = []; return; }
      if (l.startsWith(":")) return;
      const colon = l.indexOf(":");
      const field = colon < 0 ? l : l.slice(0, colon);
      let value = colon < 0 ? "" : l.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") data.push(value);
    };
    return (text, end = false) => {
      buffer += text;
      let held = "";
      if (!end && buffer.endsWith("\r")) { held = "\r"; buffer = buffer.slice(0, -1); } // maybe half a CRLF
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop() + held;
      lines.forEach(line);
      if (end) { if (buffer) line(buffer); line(""); buffer = ""; }
    };
  }

  /** Appends the streamed answer to the page; {finish, usage} (usage: the last chunk's, as include_usage asks). */
  async function stream(res) {
    let done = false;
    let finish = null;
    let usage = null;
    const feed = sseParser((data) => {
      if (done) return;
      if (data === "[DONE]") { done = true; return; }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
      if (chunk.usage) usage = chunk.usage;
      const choice = (chunk.choices || [])[0];
      if (!choice) return;
      if (choice.delta && choice.delta.content) el.answer.append(choice.delta.content);
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const { value, done: end } = await reader.read();
      if (end) { feed("", true); break; }
      feed(value);
    }
    if (!done) throw new Error("the answer stream ended before the server finished it");
    return { finish, usage };
  }

  function setState(state, status) {
    el.answer.dataset.state = state;
    el.answer.setAttribute("aria-busy", String(state === "streaming"));
    el.answerStatus.textContent = status;
  }

  function showError(message) {
    el.error.textContent = message;
    el.error.hidden = false;
  }

  async function ask(event) {
    event.preventDefault();
    if (!clip || controller) return;
    controller = new AbortController();
    el.ask.disabled = true;
    el.stop.disabled = false;
    el.error.hidden = true;
    el.answer.textContent = "";
    setState("streaming", "Answering…");
    const started = performance.now();
    try {
      const res = await fetch(ENDPOINT, {
        method: "POST", headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
        body: JSON.stringify(await requestBody()), signal: controller.signal,
      });
      if (!res.ok) throw new Error(await errorMessage(res));
      const { finish, usage } = await stream(res);
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      const tokens = usage ? `: ${usage.prompt_tokens} prompt tokens, ${usage.completion_tokens} answer tokens` : "";
      const note = finish === "length" ? " (stopped at the max tokens limit)" : "";
      setState("done", `Answered in ${seconds} s${tokens}${note}.`);
    } catch (err) {
      if (err.name === "AbortError") {
        setState("stopped", "Stopped.");
      } else {
        showError(`The request failed: ${err.message}`);
        setState("error", "");
      }
    } finally {
      controller = null;
      el.stop.disabled = true;
      el.ask.disabled = !clip;
    }
  }

  function kb(bytes) {
    return bytes < 1024 * 1024 ? `${(bytes / 1024).toFixed(0)} KB` : `${(bytes / 1024 / 1024).toFixed(1)} MB`;
  }

  /** The model name to send: the one the server lists (an OpenAI server lists its models at /v1/models). */
  async function loadModel() {
    try {
      const res = await fetch(MODELS);
      if (!res.ok) throw new Error(await errorMessage(res));
      const list = await res.json();
      if (list.data && list.data.length) {
        model = list.data[0].id;
        if (list.data[0].max_audio_seconds > 0) maxSeconds = list.data[0].max_audio_seconds;
      }
      el.modelStatus.textContent = model ? `Model: ${model}` : "Model: the server lists none";
    } catch (err) { // the server names no model: send none (its error, if any, says what it wants)
      el.modelStatus.textContent = `Model: not listed (${err.message})`;
    }
    el.maxSeconds.textContent = `up to ${maxSeconds} s`;
  }

  el.file.addEventListener("change", onFile);
  el.record.addEventListener("click", () => (recorder ? stopRecording() : startRecording()));
  el.stop.addEventListener("click", () => controller && controller.abort());
  el.form.addEventListener("submit", ask);
  const modelReady = loadModel();
})();
