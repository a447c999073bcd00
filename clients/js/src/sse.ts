// A text/event-stream parser (the WHATWG rules: CR, LF or CRLF line ends, "field: value",
// ":" comments such as the server's heartbeat, a blank line dispatches). It keeps only
// what notifyd sends: `event`, `data`, `id` and the `retry` hint.

export interface SseEvent {
  type: string;
  data: string;
  id: string | null;
}

/** Returns a function to feed decoded text chunks into; events go to `onEvent`. */
export function sseParser(onEvent: (e: SseEvent) => void, onRetry: (ms: number) => void): (chunk: string) => void {
  let buf = '';
  let data: string[] = [];
  let type = '';
  let id: string | null = null;
  const line = (l: string) => {
    if (l === '') {
      if (data.length) onEvent({ type: type || 'message', data: data.join('\n'), id });
      data = [];
      type = '';
      id = null;
      return;
    }
    if (l[0] === ':') return;
    const i = l.indexOf(':');
    const field = i < 0 ? l : l.slice(0, i);
    let value = i < 0 ? '' : l.slice(i + 1);
    if (value[0] === ' ') value = value.slice(1);
    if (field === 'data') data.push(value);
    else if (field === 'event') type = value;
    else if (field === 'id') id = value;
    else if (field === 'retry' && /^\d+$/.test(value)) onRetry(+value);
  };
  return (chunk) => {
    buf += chunk;
    let start = 0;
    for (let i = 0; i < buf.length; i++) {
      const c = buf[i];
      if (c !== '\n' && c !== '\r') continue;
      if (c === '\r' && i + 1 === buf.length) break; // a CRLF may be split across chunks
      line(buf.slice(start, i));
      if (c === '\r' && buf[i + 1] === '\n') i++;
      start = i + 1;
    }
    buf = buf.slice(start);
  };
}
