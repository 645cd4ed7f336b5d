// Refreshes the task table from api/v1/tasks without reloading the page.
// Values only ever go in through textContent, so nothing from the cloud is parsed as HTML.
"use strict";
(function () {
  const table = document.getElementById("tasks");
  const updated = document.getElementById("updated");
  const columns = Array.from(table.tHead.rows[0].cells, (th) => [th.dataset.key, th.textContent]);
  let every = Number(table.dataset.refresh || 5) * 1000;

  function row(task) {
    const tr = document.createElement("tr");
    tr.className = "health-" + task.health;
    tr.dataset.taskId = task.task_id;
    for (const [key, label] of columns) {
      const td = tr.insertCell();
      td.className = key === "trend" ? "trend trend-" + task.offset_trend : key;
      td.dataset.label = label;
      if (key === "progress" && typeof task.progress === "number") {
        const bar = document.createElement("progress");
        bar.max = 1;
        bar.value = task.progress;
        td.append(bar, " ");
      }
      td.append(task.display[key]);
      if (key === "task") {
        const id = document.createElement("small");
        id.textContent = task.task_id;
        td.append(id);
      }
    }
    return tr;
  }

  async function refresh() {
    try {
      const response = await fetch("api/v1/tasks", { cache: "no-store", credentials: "same-origin" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const data = await response.json();
      const body = table.tBodies[0];
      if (data.tasks.length) {
        body.replaceChildren(...data.tasks.map(row));
      }
      every = Number(data.refresh_seconds || 5) * 1000;
      updated.textContent = "Live · updated " + new Date().toLocaleTimeString();
      updated.classList.remove("stale");
    } catch (error) {
      updated.textContent = "Update failed (" + error.message + "); showing older values";
      updated.classList.add("stale");
    }
    setTimeout(refresh, every);
  }

  refresh();
})();
