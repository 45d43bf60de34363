// The Connect view: noVNC (Debian's novnc package, served under /novnc/) shows the VM's
// screen in #screen and sends keyboard and mouse, over a websocket to this console, which
// relays it to the VM's host (ferryd, TLS, the host's token) and on to QEMU's VNC socket.
import RFB from '/novnc/core/rfb.js';

const screen = document.getElementById('screen');
const status = document.getElementById('vnc-status');
const scheme = location.protocol === 'https:' ? 'wss://' : 'ws://';
const rfb = new RFB(screen, scheme + location.host + screen.dataset.ws);
// The guest's own pointer is drawn in the picture (USB tablet: absolute positions).
rfb.showDotCursor = true;

function say(text, cls) {
  status.textContent = text;
  status.className = cls;
}
rfb.addEventListener('connect', () => {
  say('connected', 'ok');
  rfb.focus();
});
rfb.addEventListener('disconnect', (e) => {
  say(e.detail.clean ? 'disconnected' : 'connection lost (is the VM running?)', 'error');
});
rfb.addEventListener('desktopname', (e) => {
  document.title = e.detail.name + ' · Ferry console';
});
document.getElementById('send-cad').addEventListener('click', () => {
  rfb.sendCtrlAltDel();
  rfb.focus();
});
