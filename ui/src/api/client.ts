// The typed API client: every path, body and answer comes from schema.d.ts, which
// openapi-typescript generates from the server's own OpenAPI document (a test checks it is
// current), so the UI and the server cannot drift apart.
import createClient from "openapi-fetch";
import type { components, paths } from "./schema";

export type Schemas = components["schemas"];
export type Project = Schemas["Project"];
export type Media = Schemas["Media"];
export type Job = Schemas["JobView"];
export type Model = Schemas["Model"];
export type PipelineView = Schemas["PipelineView"];
export type ActiveStatus = Schemas["ActiveStatus"];
export type Endpoint = Schemas["Endpoint"];
export type Snapshot = Schemas["Snapshot"];

/** The API token, when the server asks for one (kept in this browser only). */
export function token(): string | null {
  return localStorage.getItem("inspectflow-token");
}

export const api = createClient<paths>({ baseUrl: "" });
api.use({
  onRequest({ request }) {
    const value = token();
    if (value) request.headers.set("Authorization", `Bearer ${value}`);
    return request;
  },
});

/** A problem the API reported: its message, and for graphs every problem with node and field. */
export class ApiProblem extends Error {
  constructor(
    readonly status: number,
    readonly detail: string,
    readonly problems: GraphProblem[] = [],
  ) {
    super(detail);
  }
}

/** One graph validation problem, as the API lists them. */
export interface GraphProblem {
  node?: string;
  field?: string;
  message?: string;
  line?: number;
  column?: number;
}

/** The answer's data, or an ApiProblem carrying the server's own error text. */
export async function must<T>(
  call: Promise<{ data?: T; error?: unknown; response: Response }>,
): Promise<T> {
  const { data, error, response } = await call;
  if (error !== undefined || !response.ok) {
    const body = (error ?? {}) as { detail?: string; errors?: GraphProblem[] | null };
    throw new ApiProblem(
      response.status,
      body.detail ?? `${response.status} ${response.statusText}`,
      body.errors ?? [],
    );
  }
  return data as T;
}

/** Headers for plain fetch calls (uploads, binary answers, event streams). */
export function authHeaders(): Record<string, string> {
  const value = token();
  return value ? { Authorization: `Bearer ${value}` } : {};
}

/** Uploads one image (and optional mask) with its label. */
export async function uploadMedia(
  projectId: string,
  file: File,
  label: "normal" | "anomalous",
  mask?: File,
): Promise<Media> {
  const form = new FormData();
  form.append("label", label);
  form.append("file", file, file.name);
  if (mask) form.append("mask", mask, mask.name);
  const response = await fetch(`/api/projects/${projectId}/media`, {
    method: "POST",
    body: form,
    headers: authHeaders(),
  });
  const body = await response.json();
  if (!response.ok) throw new ApiProblem(response.status, body.detail ?? response.statusText);
  return body as Media;
}

/** Fetches a binary answer (with the token) and saves it as `filename`. */
export async function download(url: string, method: "GET" | "POST", filename: string) {
  const response = await fetch(url, { method, headers: authHeaders() });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new ApiProblem(response.status, body.detail ?? response.statusText);
  }
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = filename;
  link.click();
  URL.revokeObjectURL(link.href);
}

/** A media file's URL (thumbnails, full images). */
export function mediaUrl(projectId: string, mediaId: string, kind: "thumbnail" | "full" | "mask") {
  return `/api/projects/${projectId}/media/${mediaId}/${kind}`;
}
