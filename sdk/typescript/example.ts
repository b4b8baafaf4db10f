// A frontend's use of the generated client: submit a prompt, follow the task, read the quota. Type-checked in CI
// against the client generated from openapi/openapi.json; `tsc` fails when the two drift apart.
import { createClient } from "./src/client/client";
import { cancelTask, generateImage, getQuota, getTask, listModels } from "./src/client/sdk.gen";
import type { TaskOut } from "./src/client/types.gen";

const client = createClient({ baseUrl: "http://127.0.0.1:8000", auth: () => "igk_example.key" });

export async function draw(prompt: string): Promise<string | null> {
  const models = await listModels({ client, throwOnError: true });
  const price = models.data.data.find((entry) => entry.default)?.price_per_image.high;
  console.log(`a high-quality image costs ${price} credits`);
  const submitted = await generateImage({
    client,
    throwOnError: true,
    body: { prompt, size: "16:9", quality: "high", n: 1, style: "watercolor", enhance: "details" },
    headers: { "Idempotency-Key": crypto.randomUUID() },
  });
  let task: TaskOut = submitted.data;
  while (task.status === "queued" || task.status === "running") {
    await new Promise((resolve) => setTimeout(resolve, 500));
    task = (await getTask({ client, throwOnError: true, path: { task_id: task.id } })).data;
  }
  const quota = await getQuota({ client, throwOnError: true });
  console.log(`${quota.data.balance} credits left; refunded ${task.refunded} of ${task.cost}`);
  return task.status === "completed" ? task.image : null;
}

export async function giveUp(taskId: string): Promise<number> {
  const cancelled = await cancelTask({ client, throwOnError: true, path: { task_id: taskId } });
  return cancelled.data.refunded;
}
