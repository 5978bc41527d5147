// The dashboard's only script. The server sends the rendered live part about once a second (one snapshot shared by
// every open page); this puts it in place.
const live = document.getElementById('live');
const connection = document.getElementById('connection');
const csrf = document.querySelector('meta[name="csrf-token"]').content;

// An update that replaced a button between press and release would swallow the click: hold updates meanwhile.
let pressed = false;
let pending = null;
function show(fragment) {
  if (pressed) pending = fragment;
  else live.innerHTML = fragment;
}
function release() {
  pressed = false;
  if (pending !== null) show(pending);
  pending = null;
}
addEventListener('pointerdown', () => (pressed = true));
addEventListener('pointerup', () => setTimeout(release)); // after the click it leads to
addEventListener('pointercancel', release);

// The live part is the same for every page, so each form gets this page's CSRF token as it is sent.
addEventListener('submit', (e) => {
  const field = e.target.elements.namedItem('csrf');
  if (field) field.value = csrf;
});

const events = new EventSource('/dashboard/events');
events.onmessage = (e) => {
  connection.textContent = '';
  show(e.data);
};
// The browser reconnects by itself; a refusal (logged out, token changed) closes the stream: reload to log in.
events.onerror = () => {
  if (events.readyState === EventSource.CLOSED) location.reload();
  else connection.textContent = 'reconnecting…';
};
