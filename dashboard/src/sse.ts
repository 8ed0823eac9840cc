// Incremental parser for the text/event-stream format
// (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation).

export interface SseMessage {
  /** The `event:` field, or "message" when absent. */
  event: string;
  /** The `data:` lines joined with "\n". */
  data: string;
  /** The last event id seen on the stream, or null. */
  lastEventId: string | null;
}

export class SseParser {
  private buffer = "";
  private dataLines: string[] = [];
  private eventType = "";
  private lastEventId: string | null = null;
  /** Reconnection time requested by the server with `retry:`, in milliseconds. */
  retryMs: number | null = null;

  /** Feeds decoded text; returns the messages completed by it. */
  push(chunk: string): SseMessage[] {
    this.buffer += chunk;
    const messages: SseMessage[] = [];
    for (;;) {
      const cr = this.buffer.indexOf("\r");
      const lf = this.buffer.indexOf("\n");
      let end: number;
      if (cr === -1 && lf === -1) break;
      if (cr === -1) end = lf;
      else if (lf === -1) end = cr;
      else end = Math.min(cr, lf);
      let next = end + 1;
      if (end === cr) {
        // A lone trailing "\r" may be the first half of "\r\n": wait for more input.
        if (cr === this.buffer.length - 1) break;
        if (this.buffer[cr + 1] === "\n") next = cr + 2;
      }
      const line = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(next);
      const message = this.processLine(line);
      if (message) messages.push(message);
    }
    return messages;
  }

  private processLine(line: string): SseMessage | null {
    if (line === "") return this.dispatch();
    if (line.startsWith(":")) return null; // comment, e.g. ": ping"
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    switch (field) {
      case "event":
        this.eventType = value;
        break;
      case "data":
        this.dataLines.push(value);
        break;
      case "id":
        if (!value.includes("\u0000")) this.lastEventId = value;
        break;
      case "retry":
        if (/^\d+$/.test(value)) this.retryMs = Number(value);
        break;
      default:
        break; // unknown fields are ignored
    }
    return null;
  }

  private dispatch(): SseMessage | null {
    const hadData = this.dataLines.length > 0;
    const message: SseMessage = {
      event: this.eventType || "message",
      data: this.dataLines.join("\n"),
      lastEventId: this.lastEventId,
    };
    this.dataLines = [];
    this.eventType = "";
    return hadData ? message : null;
  }
}
