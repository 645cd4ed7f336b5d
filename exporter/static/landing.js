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
      const rows = data.tasks.map(row);
      if (!rows.length) {
        // A reload can remove every task: say so rather than keep the old rows.
        const empty = document.createElement("tr");
        empty.className = "empty";
        const cell = empty.insertCell();
        cell.colSpan = columns.length;
        cell.textContent = "No tasks configured.";
        rows.push(empty);
      }
      table.tBodies[0].replaceChildren(...rows);
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
