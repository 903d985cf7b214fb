// The globals a componentize-js (StarlingMonkey) plugin can count on. The
// tsconfig has no DOM and no Node types: these are what digibot's sandbox
// offers (console output is captured and logged as the plugin's output).

declare var console: {
  log(...data: unknown[]): void;
  info(...data: unknown[]): void;
  warn(...data: unknown[]): void;
  error(...data: unknown[]): void;
  debug(...data: unknown[]): void;
};

declare class TextEncoder {
  encode(input?: string): Uint8Array;
}
declare class TextDecoder {
  constructor(label?: string);
  decode(input?: Uint8Array): string;
}
declare class URLSearchParams {
  constructor(init?: string | Record<string, string>);
  get(name: string): string | null;
  has(name: string): boolean;
  toString(): string;
}
declare class URL {
  constructor(url: string, base?: string);
  readonly href: string;
  readonly protocol: string;
  readonly host: string;
  readonly hostname: string;
  readonly pathname: string;
  readonly search: string;
  readonly searchParams: URLSearchParams;
  toString(): string;
}
declare var crypto: {
  getRandomValues<T extends Uint8Array | Uint16Array | Uint32Array>(array: T): T;
  randomUUID(): string;
};
declare function structuredClone<T>(value: T): T;

// fetch, as StarlingMonkey implements it over wasi:http/outgoing-handler
// (digishare:bot 0.3.0): digibot allows only what NAME.toml's
// `[grants] http` names; a refused request rejects with a TypeError, and
// `outbound.lastRefusal()` says why. The subset plugins need, declared here
// because the tsconfig has no DOM types.
type HeadersInit = Headers | Record<string, string> | [string, string][];
declare class Headers {
  constructor(init?: HeadersInit);
  get(name: string): string | null;
  has(name: string): boolean;
  set(name: string, value: string): void;
  append(name: string, value: string): void;
  forEach(callback: (value: string, name: string) => void): void;
}
interface RequestInit {
  method?: string;
  headers?: HeadersInit;
  body?: string | Uint8Array;
}
declare class Response {
  readonly status: number;
  readonly ok: boolean;
  readonly headers: Headers;
  text(): Promise<string>;
  json(): Promise<unknown>;
  arrayBuffer(): Promise<ArrayBuffer>;
}
declare function fetch(url: string | URL, init?: RequestInit): Promise<Response>;
