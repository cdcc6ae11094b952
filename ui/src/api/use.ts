// Small hooks shared by the screens: loading a resource, polling it, and showing errors.
import { useCallback, useEffect, useState } from "react";
import { api, must } from "./client";

/** The project's dataset snapshots, newest first. */
export function useSnapshots(projectId: string) {
  return useResource(
    async () =>
      (await must(api.GET("/api/snapshots", { params: { query: { project_id: projectId, limit: 1000 } } }))).snapshots
        .slice()
        .reverse(),
    [projectId],
  );
}

/** Loads `fetcher`'s value; `reload` loads it again; `every` (ms) polls. */
export function useResource<T>(fetcher: () => Promise<T>, deps: unknown[], every?: number) {
  const [value, setValue] = useState<T | undefined>();
  const [error, setError] = useState<string | undefined>();
  // eslint-disable-next-line react-hooks/exhaustive-deps
  const load = useCallback(fetcher, deps);
  const reload = useCallback(async () => {
    try {
      setValue(await load());
      setError(undefined);
    } catch (e) {
      setError(e instanceof Error ? e.message : String(e));
    }
  }, [load]);
  useEffect(() => {
    void reload();
    if (!every) return;
    const timer = setInterval(() => void reload(), every);
    return () => clearInterval(timer);
  }, [reload, every]);
  return { value, error, reload };
}
