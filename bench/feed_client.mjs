// Load client for bench/feed.py: opens N feed sockets, records when each
// interaction.created event arrives and the dropped notices, and prints
// {"received": [[id, seconds], ...], "dropped": N, "closed": N}
// when stdin closes.
// Run with: node --experimental-websocket bench/feed_client.mjs URL KEY N
const [url, key, count] = process.argv.slice(2);
const received = [];
let ready = 0, dropped = 0, closed = 0;
const now = () => performance.timeOrigin + performance.now();

for (let i = 0; i < Number(count); i++) {
  const socket = new WebSocket(url.replace(/^http/, "ws") + "/api/feed/ws");
  socket.onopen = () => socket.send(JSON.stringify({ type: "auth", token: key }));
  socket.onmessage = (message) => {
    const at = now();
    const event = JSON.parse(message.data);
    if (event.type === "interaction.created") received.push([event.data.id, at / 1000]);
    else if (event.type === "ready" && ++ready === Number(count)) console.log("ready");
    else if (event.type === "dropped") dropped += event.count;
  };
  socket.onclose = () => { closed += 1; };
  socket.onerror = (error) => console.error("socket error", error.message);
}

process.stdin.on("data", () => {});
process.stdin.on("end", () => {
  const report = JSON.stringify({ received, dropped, closed });
  process.stdout.write(report + "\n", () => process.exit(0));
});
